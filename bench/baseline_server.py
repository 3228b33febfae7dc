"""The naive server ``bench/serve.py`` compares ``sora serve`` with: plain FastAPI, one forward pass per request.

No micro-batching: each request runs ``Sora.predict`` on its own texts, in FastAPI's thread pool, one at a
time (a lock: the tokenizer and the model are shared, and concurrent passes would only fight over the same
cores). This is what a first "wrap the model in an endpoint" gives.

    python bench/baseline_server.py CHECKPOINT --port 8001
"""

from __future__ import annotations

import argparse
import threading

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

import sora


class PredictRequest(BaseModel):
    texts: list[str]


def build(checkpoint: str, device: str = "cpu", dtype: str | None = None) -> FastAPI:
    model = sora.load(checkpoint, device=device, dtype=dtype)
    model.predict(["warm-up"] * 4)
    lock = threading.Lock()
    app = FastAPI(title="baseline")

    @app.post("/v1/predict")
    def predict(body: PredictRequest) -> dict:
        with lock:
            rows = model.predict(body.texts)
        return {"predictions": rows}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="the encoder's: float32 (default) or bfloat16")
    args = parser.parse_args()
    uvicorn.run(build(args.checkpoint, args.device, args.dtype), host=args.host, port=args.port, access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main()
