"""loratree engine replicas on Ray Serve, multiplexed by adapter name (``pip install
loratree[ray]``).

Importing this package does not import Ray; ``build_app`` and ``serve_on_ray`` do, and
raise a ``RuntimeError`` that says how to install it when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratree.integrations.ray.options import RayServeOptions

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["RayServeOptions", "build_app", "require_ray", "serve_on_ray"]

INSTALL_HINT = "Ray Serve is not installed: pip install loratree[ray]"


def require_ray() -> None:
    """Raise ``RuntimeError`` with the install command when Ray Serve cannot be imported."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise RuntimeError(INSTALL_HINT) from e


def build_app(options: RayServeOptions) -> Application:
    """The Serve application (ingress, replicas, ledger) for ``serve.run``."""
    require_ray()
    from loratree.integrations.ray.app import build_app as build

    return build(options)


def serve_on_ray(options: RayServeOptions, host: str = "127.0.0.1", port: int = 8000,
                 address: str | None = None) -> None:
    """Run the application on a local Ray cluster (or ``address``) until a signal."""
    require_ray()
    from loratree.integrations.ray.run import serve_on_ray as run

    run(options, host, port, address)
