"""The route registry: every model route is declared here (or in a module that registers the same way).

A new capability (question answering, generation, ...) plugs in with one decorator::

    from sora.serve.routes import route

    @route("/v1/qa", response_model=QAResponse, summary="Extractive QA")
    async def qa(request: Request, body: Annotated[QARequest, Depends(limited(QARequest))],
                 engine: Annotated[Engine, Depends(ready_engine)], state: State) -> QAResponse: ...

and is then mounted with the API-key dependency, the documented error responses, a pre-created metrics
series and, when ``batched=True``, counted in the batcher's "who else is coming" hint. Import the module
that registers it before ``create_app`` (add it to ``PLUGINS``).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.routing import APIRoute

from sora.errors import SoraError
from sora.serve.deps import State, limited, ready_engine, require_api_key
from sora.serve.engine import TEXT, Engine, pair_key
from sora.serve.schemas import (
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    InvalidResponse,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
)
from sora.tasks import kind_of

# Modules imported by ``mount`` so that their ``@route`` declarations register.
PLUGINS: list[str] = ["sora.serve.answer", "sora.serve.generate"]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERRORS = {401: _error("missing or wrong API key (only when a key is configured)"),
          503: _error("model still loading, or the server is shutting down (see Retry-After)")}
BATCHED_ERRORS = {**ERRORS, 400: _error("input the model cannot take"),
                  408: _error("the body did not arrive within body_timeout_s"),
                  413: _error("more texts than max_texts, a text longer than max_chars, or a body over max_body_bytes"),
                  429: _error("queue full: retry after the Retry-After header's seconds")}


@dataclass(frozen=True)
class RouteSpec:
    path: str
    endpoint: Callable[..., Any]
    methods: tuple[str, ...]
    response_model: Any
    summary: str
    batched: bool  # goes through the micro-batcher
    auth: bool
    tags: tuple[str, ...]
    responses: dict[int, dict[str, Any]] = field(default_factory=dict)
    exclude_none: bool = False  # leave None fields out of the response


REGISTRY: dict[str, RouteSpec] = {}


def route(path: str, *, response_model: Any, summary: str, methods: tuple[str, ...] = ("POST",),
          batched: bool = True, auth: bool = True, tags: tuple[str, ...] = ("inference",),
          responses: dict[int, dict[str, Any]] | None = None, exclude_none: bool = False):
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if path in REGISTRY and REGISTRY[path].endpoint is not fn:
            raise ValueError(f"route {path} is already registered")
        errs = dict(BATCHED_ERRORS if batched else ERRORS)
        REGISTRY[path] = RouteSpec(path, fn, methods, response_model, summary, batched, auth, tags,
                                   {**errs, **(responses or {})}, exclude_none)
        return fn

    return register


class AdmittedRoute(APIRoute):
    """A batched route: refused with 429 while the batcher's queue is full before its body is parsed and its texts
    tokenised (FastAPI parses the body before any dependency runs). Under 4x overload that work, done for requests
    that then got 429, cost the accepted ones a third of their throughput. Same 429 (detail, Retry-After) as the
    batcher's own, which still checks when the job is submitted."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def admit_then_handle(request: Request) -> Response:
            request.app.state.sora.batcher.check_capacity()
            return await handle(request)

        return admit_then_handle


def mount(app: FastAPI, auth: bool = True) -> list[RouteSpec]:
    """Add every registered route; ``auth=False`` (no key configured) leaves the key check out of the routes
    and of the OpenAPI schema."""
    for module in PLUGINS:
        importlib.import_module(module)
    specs = list(REGISTRY.values())
    for spec in specs:
        app.router.add_api_route(
            spec.path, spec.endpoint, methods=list(spec.methods), response_model=spec.response_model,
            summary=spec.summary, tags=list(spec.tags),
            responses={k: v for k, v in spec.responses.items() if k != 401 or (spec.auth and auth)},
            response_model_exclude_none=spec.exclude_none,
            dependencies=[Depends(require_api_key)] if spec.auth and auth else None,
            route_class_override=AdmittedRoute if spec.batched else APIRoute)
    return specs


Ready = Annotated[Engine, Depends(ready_engine)]


# ---- built-in routes --------------------------------------------------------------------------------------


@route("/v1/embed", response_model=EmbedResponse, summary="Sentence vectors for texts")
async def embed(request: Request, body: Annotated[EmbedRequest, Depends(limited(EmbedRequest))], engine: Ready,
                state: State) -> EmbedResponse:
    vectors = await state.infer(request.scope.setdefault("state", {}), TEXT, body.texts, ("embed", body.normalize))
    return EmbedResponse(embeddings=vectors, model=engine.name, dim=engine.dim)


@route("/v1/predict", response_model=PredictResponse,
       summary="Task-head predictions for texts or pairs (one encoder pass for all single-text heads)",
       exclude_none=True,
       responses={404: _error("a requested task is not in this model, or it has no task heads for this input"),
                  422: {"model": InvalidResponse,
                        "description": "invalid body, or a task that takes the other kind of input (texts vs pairs)"}})
async def predict(request: Request, body: Annotated[PredictRequest, Depends(limited(PredictRequest))],
                  engine: Ready, state: State) -> PredictResponse:
    if not engine.specs:
        raise HTTPException(404, f"model {engine.name!r} has no task heads: fine-tune it (sora finetune) to serve "
                                 "/v1/predict, or use /v1/embed")
    pairs = body.pairs is not None
    if body.tasks is not None:
        unknown = [t for t in body.tasks if t not in engine.specs]
        if unknown:
            raise HTTPException(404, f"no task {unknown[0]!r} in model {engine.name!r} "
                                     f"(tasks: {', '.join(engine.specs)})")
        tasks = list(dict.fromkeys(body.tasks))
        answering = [t for t in tasks if t in engine.answer_tasks]
        if answering:
            raise HTTPException(422, f"task {answering[0]!r} answers questions: POST /v1/answer")
        wrong = [t for t in tasks if engine.specs[t].pair != pairs]
        if wrong:
            need = "pairs" if engine.specs[wrong[0]].pair else "texts"
            raise HTTPException(422, f"task {wrong[0]!r} takes {need}: send `{need}`")
    else:
        tasks = engine.pair_tasks if pairs else engine.single_tasks
        if not tasks:
            need = "texts" if pairs else "pairs"
            raise HTTPException(404, f"model {engine.name!r} has no {'pair' if pairs else 'single-text'} task heads: "
                                     f"send `{need}` (tasks: {', '.join(engine.specs)})")
    scope_state = request.scope.setdefault("state", {})
    if not pairs:
        for t in tasks:  # a kind that reads more than plain text (entity markers) checks it before queueing
            try:
                kind_of(engine.specs[t]).examples_from(body.texts, engine.specs[t])
            except SoraError as exc:
                raise HTTPException(422, f"task {t!r}: {exc}") from None
        rows = await state.infer(scope_state, TEXT, body.texts, ("predict", tasks))
    else:
        items = [tuple(p) for p in body.pairs or []]
        rows = [{} for _ in items]
        # One pass per pair head (each encodes the pair its own way), queued together.
        results = await asyncio.gather(*[state.infer(scope_state, pair_key(t), items, None) for t in tasks])
        for task, preds in zip(tasks, results, strict=True):
            for row, pred in zip(rows, preds, strict=True):
                row[task] = pred
    return PredictResponse(predictions=rows, model=engine.name, tasks=tasks)


@route("/v1/models", response_model=ModelsResponse, summary="The model served: tasks, labels, version, limits",
       methods=("GET",), batched=False, tags=("model",))
async def models(engine: Ready, state: State) -> ModelsResponse:
    s = state.settings
    from sora import __version__

    card = {**engine.card(), "sora_version": __version__,
            "limits": {"max_texts": s.max_texts, "max_chars": s.max_chars, "max_new_tokens": s.max_new_tokens,
                       "max_beam": s.max_beam, "max_batch_tokens": s.max_batch_tokens,
                       "max_queue": s.max_queue, "max_wait_ms": s.max_wait_ms, "max_body_bytes": s.body_limit(),
                       "body_timeout_s": s.body_timeout_s}}
    return ModelsResponse.model_validate({"models": [card]})
