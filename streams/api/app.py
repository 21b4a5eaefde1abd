"""The HTTP API: every ``memstream serve`` process runs its processors' host behind it.

OpenAPI docs at ``/docs``. Health and publishing work in every role; search, lookups and audit
need the views (role ``views`` or ``all``), because embedded stores live in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from streams.api.deps import Service
from streams.api.limits import BodyLimit, errors, validation_error
from streams.api.routes import access, audit, chat, commands, health, memories, replay, updates
from streams.pipeline.roles import Runtime, build_runtime
from streams.settings import Settings
from streams.transport.producer import EventProducer


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The app; its lifespan builds (unless given) and starts the runtime, and stops it."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or build_runtime(settings)
        producer = EventProducer(settings)
        app.state.service = svc = Service(rt, producer)
        rt.host.start()
        try:
            yield
        finally:
            rt.host.stop()
            svc.close()
            producer.close()

    app = FastAPI(
        title="memstream",
        summary="A memory operating system for LLM agents, on Kafka.",
        version="0.2.0",
        lifespan=lifespan,
        # What BodyLimit and the body parser answer on any route: documented once, here.
        responses=errors(400, 413),
    )
    for router in (health.router, memories.router, commands.router, access.router, audit.router,
                   updates.router, replay.router, chat.router):  # fmt: skip
        app.include_router(router)
    # Every input checked at the door: a body over the limit is never read whole, and a 422
    # never echoes what it refused (streams/api/limits.py).
    app.add_middleware(BodyLimit)
    app.add_exception_handler(RequestValidationError, validation_error)
    return app
