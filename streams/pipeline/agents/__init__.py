"""memstream's Faust agents (the stateful processors): one module each for the app, topics,
tables and every agent, as faust-streaming's ``examples/fastapi_project`` lays them out."""

from streams.pipeline.agents.access import AccessStats, AccessStatsAgent, AccessView

__all__ = ["AccessStats", "AccessStatsAgent", "AccessView"]
