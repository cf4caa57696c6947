"""From the client's bytes to a routed request: where does it go?

- route.py: the routing of a realtime WebSocket handshake (by ``?model=``).
"""
