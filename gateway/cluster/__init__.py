"""The gateway's client of the cluster: the tunnel, the broker, the workers' heartbeats and the
life of one request on the wire. Nothing here speaks HTTP (no FastAPI, no Starlette, no OpenAI
error bodies): the cluster's failures are ``gateway.cluster.errors``, which the HTTP face maps to status
codes in ``gateway/errors.py``. ``tests/test_layers.py`` holds this wall up."""
