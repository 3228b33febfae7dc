"""``POST /v1/generate``: text generation (translation, summaries, ...) with a model's seq2seq head
(``sora finetune --task-type seq2seq``).

Texts join the micro-batcher under a key of their head and decoding (beam, max_new_tokens), so concurrent requests
that decode alike share one encoder pass and one beam search; the same 413/422/429 limits and metrics as the other
routes, and two of its own: ``max_new_tokens`` (the default and the cap of tokens generated per text) and
``max_beam``. A request over them is a 422 (the OpenAPI schema states both as maxima). A blank text's output is
empty (it is not sent to the model).

``"stream": true`` sends the outputs as they are decoded (greedy; a beam over 1 is a 422), as server-sent events
(``text/event-stream``): one ``data: {"index": i, "text": piece}`` event per piece, then ``event: done`` whose data
is the whole ``GenerateResponse``, or ``event: error`` with a ``detail`` if decoding failed after the stream began.
A streamed request is a batch of its own (its texts decode together); a client that disconnects stops its decoding
at the next token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.responses import StreamingResponse

from sora.serve.deps import State, limited
from sora.serve.engine import Stream, generate_key, stream_key
from sora.serve.routes import Ready, _error, route
from sora.serve.schemas import GenerateRequest, GenerateResponse, Generation, InvalidResponse, StreamPiece
from sora.serve.state import ServeState

STREAMED = {"description": "with `stream`: server-sent events, one StreamPiece each, then `event: done` (the "
                           "GenerateResponse) or `event: error`",
            "content": {"text/event-stream": {"schema": StreamPiece.model_json_schema()}}}


@route("/v1/generate", response_model=GenerateResponse,
       summary="Generated text for each source text (translation, summarisation: a seq2seq head)",
       responses={200: STREAMED, 404: _error("this model has no text-generating head (or not the one named)"),
                  422: {"model": InvalidResponse,
                        "description": "invalid body, or beam / max_new_tokens over the server's max_beam / "
                                       "max_new_tokens"}})
async def generate(request: Request, body: Annotated[GenerateRequest, Depends(limited(GenerateRequest))],
                   engine: Ready, state: State) -> GenerateResponse | StreamingResponse:
    heads = [t for t in engine.generate_tasks if body.task in (None, t)]
    if not heads:
        named = f" {body.task!r}" if body.task else ""
        raise HTTPException(404, f"model {engine.name!r} has no text-generating task{named} "
                                 f"(tasks: {', '.join(engine.specs) or 'none'}); "
                                 "fine-tune one with --task-type seq2seq")
    if len(heads) > 1:
        raise HTTPException(422, f"model {engine.name!r} has several text-generating tasks "
                                 f"({', '.join(heads)}): name one in `task`")
    s, spec = state.settings, engine.specs[heads[0]]
    if body.stream and body.beam not in (None, 1):
        raise HTTPException(422, f"stream decodes greedily: beam must be 1 (or left out), got {body.beam}")
    beam = 1 if body.stream else body.beam if body.beam is not None else min(int(spec.options.get("beam") or 1),
                                                                            s.max_beam)
    own = int(spec.options.get("max_target_length") or s.max_new_tokens)
    longest = body.max_new_tokens if body.max_new_tokens is not None else min(own, s.max_new_tokens)
    if beam > s.max_beam:
        raise HTTPException(422, f"beam {beam} > max_beam {s.max_beam}")
    if longest > s.max_new_tokens:
        raise HTTPException(422, f"max_new_tokens {longest} > the server's max_new_tokens {s.max_new_tokens}")
    # A blank source has nothing to say: its output is empty, and it never reaches the model.
    real = [i for i, t in enumerate(body.texts) if t.strip()]
    if body.stream:
        state.batcher.check_capacity()  # a full queue is a 429 before the stream starts
        events = _events(request, state, body, heads[0], longest, real, engine.name)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts = [""] * len(body.texts)
    if real:
        done = await state.infer(request.scope.setdefault("state", {}), generate_key(heads[0], beam, longest),
                                 [body.texts[i] for i in real], None)
        for i, t in zip(real, done, strict=True):
            texts[i] = t
    return GenerateResponse(outputs=[Generation(text=t) for t in texts], model=engine.name, task=heads[0],
                            beam=beam, max_new_tokens=longest)


async def _events(request: Request, state: ServeState, body: GenerateRequest, task: str, longest: int,
                  real: list[int], model: str) -> AsyncIterator[str]:
    """The server-sent events of one streamed request (module docstring)."""
    texts = [""] * len(body.texts)
    stream = Stream(asyncio.get_running_loop())
    job = None
    if real:
        scope_state = request.scope.setdefault("state", {})
        job = asyncio.ensure_future(state.infer(scope_state, stream_key(task, longest, stream),
                                                [body.texts[i] for i in real], None))
        job.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if the client left
    try:
        while job is not None:
            getter = asyncio.ensure_future(stream.pieces.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            index, piece = getter.result()
            texts[real[index]] += piece
            yield f"data: {StreamPiece(index=real[index], text=piece).model_dump_json()}\n\n"
        while not stream.pieces.empty():  # what was decoded just before the job ended
            index, piece = stream.pieces.get_nowait()
            texts[real[index]] += piece
            yield f"data: {StreamPiece(index=real[index], text=piece).model_dump_json()}\n\n"
        if job is not None and job.exception() is not None:
            yield f"event: error\ndata: {json.dumps({'detail': str(job.exception())})}\n\n"
            return
        done = GenerateResponse(outputs=[Generation(text=t) for t in texts], model=model, task=task, beam=1,
                                max_new_tokens=longest)
        yield f"event: done\ndata: {done.model_dump_json()}\n\n"
    finally:
        stream.cancel()  # a client that left stops the decoding at its next token
