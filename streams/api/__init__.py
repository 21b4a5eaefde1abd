"""The HTTP service: FastAPI app and its routers, served by every ``memstream serve`` role."""
