"""The aiohttp application and the process around it.

``app`` builds the application and its long-lived resources; ``views`` are the
endpoints; ``connections`` guards the client's connection (slow clients, parser
refusals, the drain); ``middlewares`` is the error boundary and CORS;
``process`` runs one serving process and ``workers`` supervises several.
"""
