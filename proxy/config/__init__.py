"""Reading ``routes.yaml``: from a file to frozen, typed settings, once.

``load_settings(path)`` reads a routes file; ``parse_settings(data)`` takes a
tree already loaded. Both expand ``${VAR}`` and ``${VAR:-default}`` from the
environment, validate every key and return a :class:`Settings`. Every problem
raises :class:`ConfigError` naming the file, the key path
(``routes[2].upstream``) and the offending value; nothing is checked later,
and nothing here runs at request time.

The modules, from the bottom up: settings.py (the frozen types, ``Secret``),
fields.py (the key-path cursor and the scalar validators), limits.py,
upstreams.py and sections.py (one parser per section), loader.py (YAML,
``${VAR}``, the order the sections are read in). This package imports nothing
else of the proxy's.
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
    Limits,
    LogSettings,
    MetricsSettings,
    RateLimitSettings,
    RetrySettings,
    Route,
    Secret,
    ServerSettings,
    Settings,
    Timeouts,
    TokenBudget,
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
    "Limits",
    "LogSettings",
    "MetricsSettings",
    "RateLimitSettings",
    "RetrySettings",
    "Route",
    "Secret",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "TokenBudget",
    "Upstream",
    "load_settings",
    "parse_settings",
]
