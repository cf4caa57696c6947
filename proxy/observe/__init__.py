"""What one exchange looked like, and where that record goes.

- exchange.py: :class:`Exchange`, the record of one request the request path
  fills in (never a body, a header value or a key), how it ended
  (:data:`Outcome`), and the request id.
- observer.py: :class:`Observer`, the hooks the request path calls; turns a
  finished exchange into one access-log line and into metrics.
- access_log.py: the line's two formats and the handler that writes a loop
  turn's lines at once.
- metrics.py: the Prometheus metrics (the only importer of prometheus_client)
  and their listener; metric_families.py: their names, help texts and labels.
- usage.py: token counts read from the last two chunks of a response.
- failurelog.py: a failure that keeps coming back, logged without repeating it.

The public face is the per-request record, which every stage of the request
path handles. The Observer and the metrics are imported from their modules:
re-exporting them here would load prometheus_client into every importer of
this package, ``oaimux check`` included.
"""

from .exchange import (
    CLIENT_CLOSED,
    EXCHANGE,
    OUR_REQUEST_ID_HEADER,
    OUTCOMES,
    Exchange,
    Outcome,
    new_request_id,
    request_id_for,
)

__all__ = [
    "CLIENT_CLOSED",
    "EXCHANGE",
    "OUR_REQUEST_ID_HEADER",
    "OUTCOMES",
    "Exchange",
    "Outcome",
    "new_request_id",
    "request_id_for",
]
