"""A lean HTTP/1.1 client for the hot path: it knows nothing of routes,
exchanges or the proxy's errors."""

from .pool import Origin, UpstreamFailure, UpstreamPool, UpstreamResponse

__all__ = ["Origin", "UpstreamFailure", "UpstreamPool", "UpstreamResponse"]
