"""From the client's bytes to a routed request: where does it go?

- route.py: :class:`~proxy.inbound.route.Outbound`, a routed request as
  outbound/ takes it; and the routing of a realtime WebSocket handshake (by
  ``?model=``).
"""
