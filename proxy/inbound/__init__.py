"""From the client's bytes to a routed request: where does it go?

In the order a request meets them:

- head.py: who is asking (:class:`~proxy.admission.admission.Caller`), and the
  head and target vetted (:class:`~proxy.inbound.head.Target`).
- route.py: the route chosen (by the body's model, the path, or a realtime
  handshake's ``?model=``; :data:`~proxy.inbound.route.MODEL_PATHS` is the one
  list of paths routed by model), then the routed request outbound/ takes
  (:class:`~proxy.inbound.route.Outbound`).
- body.py, upload.py: reading the body within bounds (or a large form up to
  its model field, the rest streamed on); routable.py: the body as the router
  reads it, and the model found in it.
- model.py: :class:`~proxy.inbound.model.FoundModel`, the errors the finders
  share, and the rewrite; json_model.py (the top-level ``model`` of a JSON
  body, found without parsing it), json_large.py (the same above 1 MiB) and
  multipart_model.py (the ``model`` form field) find it.
"""
