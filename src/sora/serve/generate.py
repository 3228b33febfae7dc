"""``POST /v1/generate``: text generation (translation, summaries, ...) with a model's seq2seq head
(``sora finetune --task-type seq2seq``).

Texts join the micro-batcher under a key of their head and decoding (beam, max_new_tokens), so concurrent requests
that decode alike share one encoder pass and one beam search; the same 413/422/429 limits and metrics as the other
routes, and two of its own: ``max_new_tokens`` (the default and the cap of tokens generated per text) and
``max_beam``. A request over them is a 422 (the OpenAPI schema states both as maxima). A blank text's output is
empty (it is not sent to the model).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from sora.serve.deps import State, limited
from sora.serve.engine import generate_key
from sora.serve.routes import Ready, _error, route
from sora.serve.schemas import GenerateRequest, GenerateResponse, Generation, InvalidResponse


@route("/v1/generate", response_model=GenerateResponse,
       summary="Generated text for each source text (translation, summarisation: a seq2seq head)",
       responses={404: _error("this model has no text-generating head (or not the one named)"),
                  422: {"model": InvalidResponse,
                        "description": "invalid body, or beam / max_new_tokens over the server's max_beam / "
                                       "max_new_tokens"}})
async def generate(request: Request, body: Annotated[GenerateRequest, Depends(limited(GenerateRequest))],
                   engine: Ready, state: State) -> GenerateResponse:
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
    beam = body.beam if body.beam is not None else min(int(spec.options.get("beam") or 1), s.max_beam)
    own = int(spec.options.get("max_target_length") or s.max_new_tokens)
    longest = body.max_new_tokens if body.max_new_tokens is not None else min(own, s.max_new_tokens)
    if beam > s.max_beam:
        raise HTTPException(422, f"beam {beam} > max_beam {s.max_beam}")
    if longest > s.max_new_tokens:
        raise HTTPException(422, f"max_new_tokens {longest} > the server's max_new_tokens {s.max_new_tokens}")
    # A blank source has nothing to say: its output is empty, and it never reaches the model.
    real = [i for i, t in enumerate(body.texts) if t.strip()]
    texts = [""] * len(body.texts)
    if real:
        done = await state.infer(request.scope.setdefault("state", {}), generate_key(heads[0], beam, longest),
                                 [body.texts[i] for i in real], None)
        for i, t in zip(real, done, strict=True):
            texts[i] = t
    return GenerateResponse(outputs=[Generation(text=t) for t in texts], model=engine.name, task=heads[0],
                            beam=beam, max_new_tokens=longest)
