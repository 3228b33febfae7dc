"""HTTP serving: FastAPI + uvicorn, dynamic micro-batching, Prometheus metrics (``sora serve``).

    settings (ServeSettings) → app.create_app → body.BodyLimits → routes (registry) → deps (auth, limits, readiness)
                                               → state.ServeState → batcher.MicroBatcher → engine.Engine (Sora)
"""

from sora.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run"]


def create_app(settings: ServeSettings):
    from sora.serve.app import create_app as _create

    return _create(settings)


def run(settings: ServeSettings) -> None:
    from sora.serve.server import run as _run

    _run(settings)
