"""The aiohttp application and the process around it.

``app`` builds the application and its long-lived resources; ``views`` are the
endpoints, each its own error boundary; ``middlewares`` is CORS. A client's
connection is guarded by ``connections`` (the head deadline, what it sends
before a head is parsed), ``send_watch`` (the send bound on a client that stops
reading) and ``refusals`` (what is answered before any view runs: a late or
malformed head, a target not in origin form, ``Expect``); ``drain`` is the stop
within the grace.
``process`` runs one serving process and ``workers`` supervises several.
"""
