"""Request and response bodies of the HTTP API (typed, so /docs and /openapi.json describe them exactly)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from sora.tasks import KINDS


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def all_texts(self) -> list[str]:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError


class EmbedRequest(_Request):
    texts: list[Text] = Field(min_length=1, description="texts to embed (at most the server's max_texts)",
                              examples=[["where is my parcel?", "refund please"]])
    normalize: StrictBool = Field(False, description="L2-normalise each vector")

    def all_texts(self) -> list[str]:
        return self.texts

    def count(self) -> int:
        return len(self.texts)


class PredictRequest(_Request):
    # Exactly one of texts / pairs: said in the JSON schema (oneOf) and checked. Absent, not null: the fields
    # are optional but not nullable, so the schema and the server agree on every body.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["texts"]},
                                                                            {"required": ["pairs"]}]})

    texts: Annotated[list[Text], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        None, examples=[["where is my parcel?"]], description="single texts (for single-text task heads)")
    pairs: Annotated[list[tuple[Text, Text]], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        None, description="[text_a, text_b] pairs (for pair task heads)")
    tasks: Annotated[list[Text], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        None, description="task heads to run (default: every head that fits the input)")

    @field_validator("texts", "pairs", "tasks", mode="before")
    @classmethod
    def _not_null(cls, value):
        if value is None:
            raise ValueError("leave the field out instead of sending null")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> PredictRequest:
        if (self.texts is None) == (self.pairs is None):
            raise ValueError("send exactly one of `texts` or `pairs`")
        return self

    def all_texts(self) -> list[str]:
        if self.texts is not None:
            return self.texts
        return [t for pair in self.pairs or [] for t in pair]

    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.pairs or [])


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: Text = Field(min_length=1, examples=["When was the parcel sent?"])
    context: Text = Field(min_length=1, examples=["Your parcel was sent on 3 May and arrives within a week."],
                          description="the text the answer is taken from (long ones are read in windows)")


class AnswerRequest(_Request):
    questions: list[Question] = Field(min_length=1, description="questions, each with its context; one batched pass")
    task: Text | SkipJsonSchema[None] = Field(None, description="the question-answering head (when there are several)")

    def all_texts(self) -> list[str]:
        return [t for q in self.questions for t in (q.question, q.context)]

    def count(self) -> int:
        return len(self.questions)


class Answer(BaseModel):
    answer: str = Field(description="the exact substring context[start:end]; empty when no span qualifies")
    start: int = Field(description="character offset of the answer in the context")
    end: int
    score: float = Field(description="the span's probability among the best candidates")


class AnswerResponse(BaseModel):
    answers: list[Answer]
    model: str
    task: str


class GenerateRequest(_Request):
    texts: list[Text] = Field(min_length=1, description="source texts (at most the server's max_texts)",
                              examples=[["a man rides a bike down the street"]])
    task: Text | SkipJsonSchema[None] = Field(None, description="the text-generating head (when there are several)")
    beam: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = Field(
        None, description="beam size, 1 = greedy (default: the head's; at most the server's max_beam)")
    max_new_tokens: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = Field(
        None, description="the most tokens generated per text (default and maximum: the server's max_new_tokens)")
    stream: StrictBool = Field(
        False, description="send the text as it is decoded (greedy: beam must be 1), as server-sent events: "
                           "`data: {\"index\": i, \"text\": piece}` per piece, then `event: done` with the "
                           "whole response (the GenerateResponse body), or `event: error` with its detail")

    @field_validator("task", "beam", "max_new_tokens", mode="before")
    @classmethod
    def _not_null(cls, value):
        if value is None:
            raise ValueError("leave the field out instead of sending null")
        return value

    def all_texts(self) -> list[str]:
        return self.texts

    def count(self) -> int:
        return len(self.texts)


class Generation(BaseModel):
    text: str = Field(description="the generated output")


class StreamPiece(BaseModel):
    """One server-sent event of a streamed ``POST /v1/generate``: text added to output ``index``."""

    index: int = Field(description="the input text's position in the request")
    text: str = Field(description="the text added (the pieces of an output joined are its text)")


class GenerateResponse(BaseModel):
    outputs: list[Generation] = Field(description="one per input text, in order")
    model: str
    task: str
    beam: int
    max_new_tokens: int


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    model: str
    dim: int


TaskType = Literal[tuple(KINDS)]  # type: ignore[valid-type]  # the task kinds this Sora knows


class TaskPrediction(BaseModel):
    """Classification/pair: label, score, scores. Multilabel: labels, scores. Regression: value. Seq2seq: text
    (the generated output; ``POST /v1/generate`` sets the decoding)."""

    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    labels: list[str] | None = None
    value: float | None = None
    text: str | None = None


class PredictResponse(BaseModel):
    predictions: list[dict[str, TaskPrediction]] = Field(description="one row per input: task → prediction")
    model: str
    tasks: list[str]


class TaskCard(BaseModel):
    type: TaskType
    pair: bool
    pair_mode: str
    labels: list[str] | None = None
    metric: str
    validation: dict[str, float] | None = Field(
        None, description="this task's own metrics on its validation split when the checkpoint was saved "
                          "(metadata.tasks_validation; null when the checkpoint does not say)")


class Limits(BaseModel):
    max_texts: int
    max_chars: int
    max_new_tokens: int
    max_beam: int
    max_batch_tokens: int
    max_queue: int
    max_wait_ms: float
    max_body_bytes: int
    body_timeout_s: float


class ModelCard(BaseModel):
    name: str
    version: str = Field(description="metadata.version of the checkpoint, else a hash of its weights")
    backend: str
    sora_version: str
    kind: str
    backbone: str
    dim: int
    max_length: int
    parameters: int
    tasks: dict[str, TaskCard]
    quantization: str | None = None
    dtype: str = Field("float32", description="what the encoder computes in (float32, bfloat16, float16)")
    compression: dict[str, Any] | None = None
    validation: dict[str, float | None] = Field(default_factory=dict,
                                                description="measured on the validation split when saved")
    metadata: dict[str, Any] = Field(default_factory=dict)
    limits: Limits


class ModelsResponse(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed", "draining"]
    model: str | None = None
    detail: str | None = None


class ErrorResponse(BaseModel):
    detail: str


class InvalidResponse(BaseModel):
    """422: FastAPI's list of validation errors, or one message (a task that takes the other kind of input)."""

    detail: str | list[dict[str, Any]]
