"""FastAPI dependencies: the process state, readiness, the API key and the request-size limits.

All ``async def``: none of them blocks, and FastAPI runs a plain ``def`` dependency in its thread pool, a
thread hop per dependency per request (measured: with four of them, ~15% of the server's throughput at
400 requests/s went to those hops).
"""

from __future__ import annotations

import hmac
import inspect
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sora.serve.engine import Engine
from sora.serve.schemas import _Request
from sora.serve.state import ServeState

_bearer = HTTPBearer(auto_error=False, description="the key in the env var named by --api-key-env "
                                                   "(only when that variable is set)")


async def get_state(request: Request) -> ServeState:
    return request.app.state.sora


State = Annotated[ServeState, Depends(get_state)]


async def require_api_key(state: State,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """401 unless ``Authorization: Bearer <key>`` matches (constant-time); a no-op when no key is set."""
    if state.api_key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not (given and hmac.compare_digest(given.encode(), state.api_key.encode())):
        raise HTTPException(401, "missing or wrong API key: send Authorization: Bearer <key>",
                            headers={"WWW-Authenticate": "Bearer"})


class NotReady(Exception):
    def __init__(self, status: str, detail: str | None = None):
        super().__init__(detail or f"model {status}")
        self.status = status


async def ready_engine(state: State) -> Engine:
    """The loaded model, or 503 (with Retry-After) while it loads or once the server drains."""
    if not state.ready or state.engine is None or state.batcher.closing:
        raise NotReady(state.status, state.detail)
    return state.engine


def limited(model: type[_Request]):
    """A dependency that parses the body as ``model`` and enforces --max-texts and --max-chars (413)."""

    async def check(body, state: State):
        s = state.settings
        if body.count() > s.max_texts:
            raise HTTPException(413, f"too many texts: {body.count()} > max_texts {s.max_texts} "
                                     f"(split the request; SoraClient does this for you)")
        for i, text in enumerate(body.all_texts()):
            if len(text) > s.max_chars:
                raise HTTPException(413, f"text {i} is too long: {len(text)} characters > max_chars {s.max_chars}")
        return body

    params = list(inspect.signature(check).parameters.values())
    check.__signature__ = inspect.Signature([params[0].replace(annotation=model), params[1].replace(annotation=State)],
                                            return_annotation=model)
    check.__annotations__ = {"body": model, "state": State, "return": model}
    return check
