"""What the routers share: the process's runtime and producer, and the checks on them."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import HTTPException, Request

from streams.pipeline.build import Stores
from streams.pipeline.roles import Runtime
from streams.pipeline.views import ViewsProcessor
from streams.query.time_travel import TimeTravel
from streams.transport.producer import EventProducer


@dataclass
class Service:
    """The process behind the API (set by the app's lifespan)."""

    runtime: Runtime
    producer: EventProducer
    time_travel: TimeTravel = field(init=False)

    def __post_init__(self) -> None:
        self.time_travel = TimeTravel(
            self.runtime.settings, self.runtime.snapshots, self.runtime.codec
        )

    def stores(self) -> Stores:
        """The view stores, or a 503 that says which role serves them."""
        if self.runtime.stores is None:
            raise HTTPException(
                503,
                f"this process runs role {self.runtime.role!r}, which has no views; "
                "ask a process with role 'views' or 'all'",
            )
        return self.runtime.stores

    def views(self) -> ViewsProcessor:
        self.stores()
        views = self.runtime.host.get("views")
        if not isinstance(views, ViewsProcessor):
            raise HTTPException(503, "the views processor is restarting")
        return views


def service(request: Request) -> Service:
    return request.app.state.service
