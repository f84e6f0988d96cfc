"""``loratree serve --ray``: start (or join) a Ray cluster, run the application, serve until
a signal, then shut Serve down."""

from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from .app import build_app
from .options import RayServeOptions

__all__ = ["serve_on_ray"]

logger = logging.getLogger(__name__)


def serve_on_ray(options: RayServeOptions, host: str = "127.0.0.1", port: int = 8000,
                 address: str | None = None) -> None:
    """Serve ``options`` on Ray: a local cluster (``address`` None) or the cluster at
    ``address`` (``"auto"``: the one ``ray start`` runs on this machine). Blocks until
    SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=address, include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(options), name=options.name, route_prefix="/")
        logger.info("serving %d replica(s) on http://%s:%d/v1", options.replicas, host, port)
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
