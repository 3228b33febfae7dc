"""Start uvicorn for ``sora serve``: one process, or N worker processes sharing the port."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from sora.errors import ConfigError, SoraError
from sora.serve.metrics import MULTIPROC_ENV
from sora.serve.settings import SETTINGS_ENV, ServeSettings


def run(settings: ServeSettings) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, let in-flight requests finish, drain the batcher."""
    import uvicorn

    from sora.models.checkpoint import resolve_checkpoint

    resolve_checkpoint(settings.checkpoint)  # a wrong path fails here, as one line, before anything starts
    settings.configure_logging()
    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                  access_log=settings.access_log, timeout_graceful_shutdown=int(settings.graceful_timeout_s),
                  proxy_headers=False, server_header=False)
    if settings.workers == 1:
        from sora.serve.app import create_app

        app = create_app(settings)
        state = app.state.sora
        # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal with the handler it found:
        # make that handler exit 0 (a clean drain), or 2 when the model could not be loaded.
        signal.signal(signal.SIGTERM, lambda *_: _exit(state.status, state.detail))
        uvicorn.run(app, **common)
        _exit(state.status, state.detail)
    multiproc = os.environ.get(MULTIPROC_ENV)
    if multiproc:
        d = Path(multiproc)
        if d.exists() and not d.is_dir():
            raise ConfigError(f"{MULTIPROC_ENV}={multiproc}: not a directory")
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*.db"):  # samples of a previous run would be summed with this one's
            stale.unlink()
    else:
        logging.getLogger("sora.serve").warning(
            "--workers %d without %s: each scrape of /metrics shows one worker's numbers only",
            settings.workers, MULTIPROC_ENV)
    os.environ[SETTINGS_ENV] = settings.to_env()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run("sora.serve.app:app_from_env", factory=True, workers=settings.workers, **common)


def _exit(status: str, detail: str | None) -> None:
    if status == "failed":
        raise SoraError(f"the model could not be served: {detail}")
    sys.exit(0)
