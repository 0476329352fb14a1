"""The HTTP layer: FastAPI app, wire schemas, routers and the one exception-to-HTTP mapping."""
