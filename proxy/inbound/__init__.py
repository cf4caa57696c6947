"""From the client's bytes to a routed request: where does it go?

- body.py, upload.py: reading the body (or a large form up to its model field).
- model.py: :class:`~proxy.inbound.model.FoundModel`, the errors the finders
  share, and the rewrite; json_model.py (the top-level ``model`` of a JSON
  body, found without parsing it), json_large.py (the same above 1 MiB) and
  multipart_model.py (the ``model`` form field) find it.
- route.py: :class:`~proxy.inbound.route.Outbound`, a routed request as
  outbound/ takes it; and the routing of a realtime WebSocket handshake (by
  ``?model=``).
"""
