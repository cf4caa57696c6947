"""Take a routed request to an upstream, and its answer back to the client.

- forward.py: send the request along its route until an upstream answers.
- relay.py: relay that answer to the client (head, then body).
- attempts.py: what happened at each upstream a request tried, in words.
- health.py: circuit breakers, and the order a route's upstreams are tried in.
- pipe.py: move a response body from the upstream to the client as it is parsed.
- realtime.py: a realtime WebSocket session's upstream leg (the handshake).
- tunnel.py: the session's two legs, relayed frame by frame.
"""
