"""``POST /v1/answer``: extractive question answering with a model's QA head (``sora finetune --task-type qa``).

Several questions per request, each with its own context; they join the micro-batcher like pairs do (one queue,
the same 413/422/429 limits and metrics as the other routes), and long contexts are read in overlapping windows.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from sora.serve.deps import State, limited
from sora.serve.engine import pair_key
from sora.serve.routes import Ready, _error, route
from sora.serve.schemas import AnswerRequest, AnswerResponse


@route("/v1/answer", response_model=AnswerResponse,
       summary="Answers as spans of the given contexts (extractive question answering)",
       responses={404: _error("this model has no question-answering head (or not the one named)")})
async def answer(request: Request, body: Annotated[AnswerRequest, Depends(limited(AnswerRequest))],
                 engine: Ready, state: State) -> AnswerResponse:
    heads = [t for t in engine.answer_tasks if body.task in (None, t)]
    if not heads:
        named = f" {body.task!r}" if body.task else ""
        raise HTTPException(404, f"model {engine.name!r} has no question-answering task{named} "
                                 f"(tasks: {', '.join(engine.specs) or 'none'}); fine-tune one with --task-type qa")
    if len(heads) > 1:
        raise HTTPException(422, f"model {engine.name!r} has several question-answering tasks "
                                 f"({', '.join(heads)}): name one in `task`")
    items = [(q.question, q.context) for q in body.questions]
    rows = await state.infer(request.scope.setdefault("state", {}), pair_key(heads[0]), items, None)
    return AnswerResponse(answers=rows, model=engine.name, task=heads[0])
