"""From the client's bytes to a routed request: where does it go?

- body.py, upload.py: reading the body (or a large form up to its model field).
- findmodel.py: the top-level ``model`` of a JSON body, found without parsing it.
- route.py: :class:`~proxy.inbound.route.Outbound`, a routed request as
  outbound/ takes it; and the routing of a realtime WebSocket handshake (by
  ``?model=``).
"""
