"""Running the app under uvicorn, with a draining shutdown.

On SIGTERM (or SIGINT) the server drains: ``/ready`` turns false, new generation requests
get 503, requests in flight run to their end for up to ``drain_timeout_s``, then uvicorn
stops and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI

from loratree.serve.http import ServerState

__all__ = ["DrainingServer", "serve_app", "serve_in_thread"]

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState,
                 drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout_s = state, drain_timeout_s
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drainer is not None:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        logger.info("signal %d: draining %d request(s) in flight", sig, self.state.in_flight)
        self.state.draining = True
        self._drainer = threading.Thread(target=self._drain, name="loratree-drain",
                                         daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        end = time.monotonic() + self.drain_timeout_s
        while self.state.in_flight > 0 and time.monotonic() < end:
            time.sleep(0.05)
        if self.state.in_flight:
            logger.warning("drain timeout: %d request(s) still in flight", self.state.in_flight)
        else:
            logger.info("drained")
        self.should_exit = True


def serve_app(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
              drain_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Serve until a signal, then drain (blocks)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    DrainingServer(config, app.state.loratree, drain_timeout_s).run()


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` on a free port of ``host`` from a background thread; yields the base
    URL (``http://host:port``) and stops the server on exit. For tests, benchmarks and
    embedding; signals stay with the main thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=5, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="loratree-http", daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
