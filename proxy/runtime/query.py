"""Query parameter names, compared one way wherever the proxy reads them.

The inbound vetting (inbound/head.py) drops key-bearing parameters and reads
``model``, which the routing may rewrite (inbound/route.py); an upstream's
``query`` replaces a client parameter of the same name (runtime.py). All
compare a name percent-decoded (``+`` as a space, as HTML forms encode it)
and without regard to case, so ``API-Version`` and ``api%2Dversion`` name the
same parameter for each (README, "Azure OpenAI").
"""

from __future__ import annotations

from urllib.parse import unquote_plus

__all__ = ["query_param_name"]


def query_param_name(part: str) -> str:
    """The name of one ``name=value`` part of a raw query string, percent-decoded
    and lower-cased."""
    return unquote_plus(part.partition("=")[0]).lower()
