"""Take a routed request to an upstream, and its answer back to the client.

- forward.py: send the request along its route until an upstream answers.
- relay.py: relay that answer to the client (head, then body).
- attempts.py: what happened at each upstream a request tried, in words.
- health.py: circuit breakers, and the order a route's upstreams are tried in.
- pipe.py: move a response body from the upstream to the client as it is parsed.
- realtime.py: the WebSocket sessions' one entry: a realtime session (upstream leg first).
- responses_socket.py: a Responses WebSocket session (client leg first, routed by
  its first message; later messages vetted and charged).
- upstream_leg.py: a session's upstream leg: the route's walk, the handshake.
- client_leg.py: a session's client leg: subprotocols and the ``101``.
- tunnel.py: the session's two legs, relayed frame by frame.
"""
