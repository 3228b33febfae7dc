"""A small synchronous client for ``sora serve``: ``SoraClient(url).predict(texts)``.

Large inputs are split into requests of at most the server's ``max_texts`` (read once from /v1/models);
429 and 503 answers are retried after the server's Retry-After (bounded); any other failure raises
``SoraClientError`` (a ``SoraError``) with the status code and the server's message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np

from sora.errors import SoraError

RETRY_STATUSES = (429, 503)


class SoraClientError(SoraError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class SoraClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 5,
                 max_retry_wait: float = 30.0, batch_size: int | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.max_retries, self.max_retry_wait, self.batch_size = max_retries, max_retry_wait, batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)
        self._card: dict[str, Any] | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SoraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- HTTP ---------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, json: Any = None, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        waited = 0.0
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TimeoutException:
                raise SoraClientError(f"{method} {self.url}{path}: no answer within the timeout") from None
            except httpx.HTTPError as exc:
                raise SoraClientError(f"cannot reach {self.url}: {exc}") from None
            if response.status_code in ok:
                return response
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                wait = _retry_after(response, default=0.5 * 2**attempt)
                if waited + wait <= self.max_retry_wait:
                    time.sleep(wait)
                    waited += wait
                    continue
            raise SoraClientError(f"{method} {path}: HTTP {response.status_code}: {_detail(response)}",
                                  response.status_code)
        raise AssertionError("unreachable")

    # ---- API ----------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """{"live": bool, "ready": bool, "status": "ready"|"loading"|..., "model": name}."""
        try:
            live = self._http.get("/healthz").status_code == 200
            ready = self._http.get("/readyz")
        except httpx.HTTPError as exc:
            raise SoraClientError(f"cannot reach {self.url}: {exc}") from None
        body = ready.json() if ready.headers.get("content-type", "").startswith("application/json") else {}
        return {"live": live, "ready": ready.status_code == 200, "status": body.get("status"),
                "model": body.get("model")}

    def models(self) -> dict[str, Any]:
        """The server's model card: name, version, tasks (type, labels, pair), validation metrics, limits."""
        self._card = self._request("GET", "/v1/models").json()["models"][0]
        return self._card

    def _chunk(self) -> int:
        if self._card is None:
            self.models()
        limit = int((self._card or {}).get("limits", {}).get("max_texts", 64))
        return max(1, min(limit, self.batch_size or limit))

    def embed(self, texts: Sequence[str], normalize: bool = False) -> np.ndarray:
        """Vectors (n, dim) float32, in the order of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts, not one string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, int((self._card or self.models())["dim"])), dtype=np.float32)
        n = self._chunk()
        parts = [self._request("POST", "/v1/embed", {"texts": texts[i : i + n], "normalize": normalize}
                               ).json()["embeddings"] for i in range(0, len(texts), n)]
        return np.asarray([v for part in parts for v in part], dtype=np.float32)

    def predict(self, inputs: Sequence[str] | Sequence[tuple[str, str]], tasks: Sequence[str] | str | None = None
                ) -> list[dict[str, Any]]:
        """One row per input: task → prediction, as ``Sora.predict``. Pairs are (text_a, text_b) tuples."""
        if isinstance(inputs, str):
            raise TypeError("predict() takes a list of texts or pairs, not one string")
        inputs = list(inputs)
        if not inputs:
            return []
        pairs = not isinstance(inputs[0], str)
        key = "pairs" if pairs else "texts"
        task_list = [tasks] if isinstance(tasks, str) else (list(tasks) if tasks else None)
        n = self._chunk()
        rows: list[dict[str, Any]] = []
        for i in range(0, len(inputs), n):
            chunk = [list(p) for p in inputs[i : i + n]] if pairs else inputs[i : i + n]
            body: dict[str, Any] = {key: chunk}
            if task_list:
                body["tasks"] = task_list
            rows.extend(self._request("POST", "/v1/predict", body).json()["predictions"])
        return rows

    def answer(self, questions: Sequence[tuple[str, str]], task: str | None = None) -> list[dict[str, Any]]:
        """Answers to (question, context) pairs from the model's QA head, as ``Sora.answer``."""
        items = list(questions)
        n = self._chunk()
        rows: list[dict[str, Any]] = []
        for i in range(0, len(items), n):
            body: dict[str, Any] = {"questions": [{"question": q, "context": c} for q, c in items[i : i + n]]}
            if task:
                body["task"] = task
            rows.extend(self._request("POST", "/v1/answer", body).json()["answers"])
        return rows


    def generate(self, texts: Sequence[str], task: str | None = None, beam: int | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        """The generated text of each source text from the model's seq2seq head, as ``Sora.generate``."""
        if isinstance(texts, str):
            raise TypeError("generate() takes a list of texts, not one string")
        items = list(texts)
        n = self._chunk()
        out: list[str] = []
        for i in range(0, len(items), n):
            body: dict[str, Any] = {"texts": items[i : i + n]}
            for key, value in (("task", task), ("beam", beam), ("max_new_tokens", max_new_tokens)):
                if value is not None:
                    body[key] = value
            out.extend(o["text"] for o in self._request("POST", "/v1/generate", body).json()["outputs"])
        return out

    def stream(self, texts: Sequence[str], task: str | None = None,
               max_new_tokens: int | None = None) -> Iterator[tuple[int, str]]:
        """Greedy generation as the server decodes it (``POST /v1/generate`` with ``stream``): (index of the
        text, text added) pairs, as ``Sora.stream``. A failure before or during the stream raises
        ``SoraClientError``."""
        if isinstance(texts, str):
            raise TypeError("stream() takes a list of texts, not one string")
        items = list(texts)
        n = self._chunk()
        for first in range(0, len(items), n):
            body: dict[str, Any] = {"texts": items[first : first + n], "stream": True}
            for key, value in (("task", task), ("max_new_tokens", max_new_tokens)):
                if value is not None:
                    body[key] = value
            for event, data in self._events("/v1/generate", body):
                if event == "error":
                    raise SoraClientError(f"POST {self.url}/v1/generate: {data.get('detail')}")
                if event == "message":
                    yield first + data["index"], data["text"]

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event name, its JSON data) of a server-sent event stream ("message" when unnamed)."""
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise SoraClientError(f"POST {self.url}{path}: {response.status_code} {_detail(response)}",
                                          response.status_code)
                event = "message"
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        yield event, json.loads(line[5:])
                    elif not line:
                        event = "message"
        except httpx.TimeoutException:
            raise SoraClientError(f"POST {self.url}{path}: no answer within the timeout") from None
        except httpx.HTTPError as exc:
            raise SoraClientError(f"cannot reach {self.url}: {exc}") from None


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return default


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(detail, list):  # FastAPI's 422: a list of {loc, msg}
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail[:3])
    return str(detail)
