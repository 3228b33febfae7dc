"""What ``sora serve`` was asked for: one pydantic model, passed to each worker process as JSON in an env var."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SETTINGS_ENV = "SORA_SERVE_SETTINGS"


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    model_name: str | None = Field(None, min_length=1, max_length=128)  # default: the checkpoint's directory name
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per worker (default: state.default_threads)
    api_key_env: str | None = "SORA_API_KEY"  # the NAME of the env var holding the key; unset or empty: no auth
    max_batch_tokens: int = Field(8192, ge=1)  # padded tokens (texts × longest) per forward pass
    max_wait_ms: float = Field(5.0, ge=0)  # how long the first request of a batch may wait for company
    max_queue: int = Field(1024, ge=1)  # requests waiting for a forward pass; more → 429
    max_texts: int = Field(256, ge=1)  # texts (or pairs) per request; more → 413
    max_chars: int = Field(5000, ge=1)  # characters per text; more → 413
    backend: Literal["auto", "torch", "onnx"] = "auto"  # auto: what the checkpoint says (sora compress)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the encoder's; auto: the checkpoint's
    device: str = "cpu"
    graceful_timeout_s: float = Field(30.0, gt=0)  # SIGTERM: how long in-flight requests may take to finish
    access_log: bool = False
    log_level: str = "info"

    def api_key(self) -> str | None:
        """The key itself, read from the environment now (never stored in the settings or logged)."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def to_env(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_env(cls) -> ServeSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(f"{SETTINGS_ENV} is not set: start the server with `sora serve CHECKPOINT`")
        return cls.model_validate_json(raw)
