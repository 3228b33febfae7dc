"""What ``sora serve`` was asked for: one pydantic model, passed to each worker process as JSON in an env var."""

from __future__ import annotations

import logging
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SETTINGS_ENV = "SORA_SERVE_SETTINGS"
MAX_BODY_ENV, BODY_TIMEOUT_ENV = "SORA_MAX_BODY_BYTES", "SORA_BODY_TIMEOUT_S"
# The most JSON one character can take: an astral one, escaped as a surrogate pair ("\ud83d\ude00").
_JSON_BYTES_PER_CHAR = 12


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
    max_new_tokens: int = Field(128, ge=1)  # /v1/generate: tokens generated per text (the default and the cap)
    max_beam: int = Field(8, ge=1)  # /v1/generate: the widest beam a request may ask for
    # Request bodies: more bytes → 413 (by Content-Length before reading, else as they arrive); not all received
    # within body_timeout_s → 408. Unset max_body_bytes: the largest body max_texts and max_chars can let through.
    max_body_bytes: int | None = Field(default_factory=lambda: os.environ.get(MAX_BODY_ENV) or None, ge=1,
                                       validate_default=True)
    body_timeout_s: float = Field(default_factory=lambda: os.environ.get(BODY_TIMEOUT_ENV) or 10.0, gt=0,
                                  validate_default=True)
    backend: Literal["auto", "torch", "onnx"] = "auto"  # auto: what the checkpoint says (sora compress)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the encoder's; auto: the checkpoint's
    device: str = "cpu"
    graceful_timeout_s: float = Field(30.0, gt=0)  # SIGTERM: how long in-flight requests may take to finish
    access_log: bool = False
    log_level: str = "info"

    def configure_logging(self) -> None:
        """Sora's own log lines (model loaded, auth on/off, load failures) beside uvicorn's, in every process."""
        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def api_key(self) -> str | None:
        """The key itself, read from the environment now (never stored in the settings or logged)."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def body_limit(self) -> int:
        """max_body_bytes, or room for max_texts pairs of max_chars-character texts, each character as JSON's
        longest escape, plus 64 KiB for the rest: a body that passes --max-texts and --max-chars is never refused
        for its size."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return 2 * self.max_texts * self.max_chars * _JSON_BYTES_PER_CHAR + 65536

    def to_env(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_env(cls) -> ServeSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(f"{SETTINGS_ENV} is not set: start the server with `sora serve CHECKPOINT`")
        return cls.model_validate_json(raw)
