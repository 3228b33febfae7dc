"""The FastAPI application: ``create_app(settings)``.

Open without a key: /healthz (live) and /readyz (model loaded and warmed), GET or HEAD; /metrics (Prometheus);
the API's docs, /docs (Swagger UI), /redoc (ReDoc) and /openapi.json. Every model route (/v1/...) needs
``Authorization: Bearer <key>`` when the env var named by ``--api-key-env`` is set.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sora import __version__
from sora.errors import SoraError
from sora.serve import routes as route_registry
from sora.serve.batcher import BatcherClosed, QueueFull
from sora.serve.body import BodyLimits
from sora.serve.deps import NotReady, State
from sora.serve.metrics import CLIENT_CLOSED, OTHER_ROUTE
from sora.serve.schemas import Health, Readiness
from sora.serve.settings import ServeSettings
from sora.serve.state import ServeState

OPEN_ROUTES = ["/healthz", "/readyz", "/metrics"]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Observability:
    """Pure ASGI middleware: X-Request-ID, Server-Timing, in-flight gauge, per-route count and latency.

    A client that disconnects before its answer is counted as 499 (nginx's "client closed request"), whatever the
    application then tried to send: it is not the client's error (400) nor the server's (5xx)."""

    def __init__(self, app: ASGIApp, state: ServeState):
        self.app, self.state = app, state
        self.known = set(state.metrics.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        local = scope.setdefault("state", {})
        local["request_id"] = rid
        status = 500
        gone = False  # the client disconnected before the response started
        responded = False
        st, metrics = self.state, self.state.metrics
        batched = scope["path"] in st.batched_paths
        metrics.inflight.inc()
        if batched:
            st.batched_inflight += 1

        async def receive_watching() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and not responded:
                gone = True
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                timing = local.get("timing") or {}
                parts = [f"{k};dur={v * 1000:.2f}" for k, v in timing.items()]
                parts.append(f"total;dur={(time.perf_counter() - t0) * 1000:.2f}")
                headers["Server-Timing"] = ", ".join(parts)
            await send(message)

        try:
            await self.app(scope, receive_watching, send_with_headers)
        finally:
            metrics.inflight.dec()
            if batched:
                st.batched_inflight -= 1
                st.batcher.notify()
            # No route when the body limits answered before routing: then the path, if it is a route's.
            path = getattr(scope.get("route"), "path", None) or scope["path"]
            metrics.observe_request(path if path in self.known else OTHER_ROUTE, CLIENT_CLOSED if gone else status,
                                    time.perf_counter() - t0)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a validation error echoing a lone surrogate still encodes (no 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _document_limits(schema: dict, settings: ServeSettings) -> None:
    """Put --max-texts / --max-chars into the request schemas (maxItems / maxLength), and --max-beam /
    --max-new-tokens (maximum): the docs show this server's limits, and clients that validate against the schema
    never send what would get a 413 (or /v1/generate's 422)."""
    for name, model in schema.get("components", {}).get("schemas", {}).items():
        if not name.endswith("Request"):
            continue
        for field in ("texts", "pairs"):
            prop = model.get("properties", {}).get(field)
            if not prop or prop.get("type") != "array":
                continue
            prop["maxItems"] = settings.max_texts
            items = prop.get("items", {})
            for text in items.get("prefixItems", [items]):
                if text.get("type") == "string":
                    text["maxLength"] = settings.max_chars
        for field, limit in (("beam", settings.max_beam), ("max_new_tokens", settings.max_new_tokens)):
            prop = model.get("properties", {}).get(field)
            if prop and prop.get("type") == "integer":
                prop["maximum"] = limit


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _json_safe(errors: list[dict]) -> list[dict]:
    """Validation errors without the parts that hold NaN or ±Infinity (``input``, mostly). json.loads reads
    ``NaN``, ``Infinity`` and ``1e400`` anywhere in a body; echoed back, they cannot be written as JSON, and the
    422 became a 500 that dropped the connection."""
    return [{k: v for k, v in error.items() if _finite(v)} for error in errors]


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(settings: ServeSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await app.state.sora.start()
        yield
        await app.state.sora.stop()

    app = FastAPI(title="Sora", version=__version__, lifespan=lifespan,
                  summary="Sentence vectors and task-head predictions from a Sora checkpoint",
                  description="Micro-batched inference: concurrent requests share forward passes. "
                              "Model routes need `Authorization: Bearer <key>` when the server has a key; "
                              "/healthz, /readyz, /metrics and these docs (/docs, /redoc, /openapi.json) are open.",
                  swagger_ui_oauth2_redirect_url=None)  # no OAuth2 flow here: one open page fewer
    specs = route_registry.mount(app, auth=settings.api_key() is not None)
    base_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _document_limits(base_openapi(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    state = ServeState(settings, [s.path for s in specs] + OPEN_ROUTES, {s.path for s in specs if s.batched})
    app.state.sora = state

    # Probes answer HEAD too (load balancers send it), a route of its own left out of the schema (one route with
    # both methods would give both the same operationId). GET is registered first: its Allow header answers OPTIONS.
    @app.head("/healthz", response_model=Health, include_in_schema=False)
    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness: the process answers (GET or HEAD)")
    async def healthz() -> Health:
        return Health()

    @app.head("/readyz", response_model=Readiness, include_in_schema=False)
    @app.get("/readyz", response_model=Readiness, tags=["ops"],
             summary="Readiness: the model is loaded and warmed (503 until then, and while draining; GET or HEAD)",
             responses={503: {"model": Readiness, "description": "loading, failed or draining"}})
    async def readyz(st: State, response: Response) -> Readiness:
        ready = st.ready and not st.batcher.closing
        if not ready:
            response.status_code = 503
        return Readiness(status="draining" if st.ready and not ready else st.status,
                         model=st.engine.name if st.engine else None, detail=st.detail)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (text format)", include_in_schema=False)
    async def metrics(st: State) -> Response:
        body, content_type = st.metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return AsciiJSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return _error(429, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(NotReady)
    async def not_ready(_: Request, exc: NotReady) -> JSONResponse:
        return _error(503, f"not ready ({exc.status}): {exc}", {"Retry-After": "1"})

    @app.exception_handler(BatcherClosed)
    async def closed(_: Request, exc: BatcherClosed) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1", "Connection": "close"})

    @app.exception_handler(SoraError)
    async def sora_error(_: Request, exc: SoraError) -> JSONResponse:
        return _error(400, str(exc))

    app.add_middleware(BodyLimits, max_bytes=settings.body_limit(), timeout_s=settings.body_timeout_s)
    app.add_middleware(Observability, state=state)  # outermost: it counts what BodyLimits refuses too
    return app


def app_from_env() -> FastAPI:
    """The factory uvicorn's worker processes call (``--workers N``): settings come from SORA_SERVE_SETTINGS."""
    settings = ServeSettings.from_env()
    settings.configure_logging()
    return create_app(settings)
