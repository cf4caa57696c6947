"""Reading ``routes.yaml``: from a file to frozen, typed settings, once.

``load_settings(path)`` reads a routes file; ``parse_settings(data)`` takes a
tree already loaded. Both expand ``${VAR}`` and ``${VAR:-default}`` from the
environment, validate every key and return a :class:`Settings`. Every problem
raises :class:`ConfigError` naming the file, the key path
(``routes[2].upstream``) and the offending value; nothing is checked later, at
request time, and nothing here runs at request time.

This package imports nothing else of the proxy's.
"""

from __future__ import annotations

from .loader import load_settings, parse_settings
from .settings import (
    AuthKey,
    Balance,
    CircuitBreakerSettings,
    ConfigError,
    CorsSettings,
    EnvSubstitution,
    HeaderRewrite,
    LogSettings,
    MetricsSettings,
    RateLimitSettings,
    RetrySettings,
    Route,
    Secret,
    ServerSettings,
    Settings,
    Timeouts,
    Upstream,
)

__all__ = [
    "AuthKey",
    "Balance",
    "CircuitBreakerSettings",
    "ConfigError",
    "CorsSettings",
    "EnvSubstitution",
    "HeaderRewrite",
    "LogSettings",
    "MetricsSettings",
    "RateLimitSettings",
    "RetrySettings",
    "Route",
    "Secret",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "Upstream",
    "load_settings",
    "parse_settings",
]
