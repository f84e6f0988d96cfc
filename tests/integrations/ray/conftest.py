"""A local Ray cluster serving 2 loratree replicas of the tiny model over 12 adapters.

Ray starts in this process (``ray.init``) with the repository on the workers' import path,
so every replica builds the same tiny model through ``tests.integrations.ray.factory``.
"""

import os
import shutil
import socket
from pathlib import Path

import pytest

from loratree.adapters import AdapterStore
from loratree.integrations.ray import RayServeOptions, build_app
from loratree.serve.http import ServerConfig
from tests.integrations.ray.factory import FACTORY
from tests.serve.conftest import lora_adapter

NO_RAY = "Ray Serve is not installed (pip install loratree[ray])"
ROOT = Path(__file__).resolve().parents[3]
N_ADAPTERS = 12
FOLDER_ADAPTERS = ("plain/p0", "plain/p1")
"""Served from a plain folder beside the store (``--adapters-dir``)."""
HELD = 8
"""Adapters one replica's cache holds: 2 replicas hold all 12 with room to spare."""
MAX_ONGOING = 8
"""Requests one replica takes at once: a running batch (max_batch 4) and a waiting one."""


SLOW_HOST = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
             "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}
"""Ray Serve kills an HTTP proxy not ready within 5 s (its default); on a busy 2-core host
its start can take longer, and the cluster then failed to start (seen once here)."""


@pytest.fixture(scope="session")
def twelve(tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for i in range(N_ADAPTERS):
        store.save(f"a{i:02d}", lora_adapter(100 + i), 0)
    return store


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A plain folder (no store) of PEFT adapter directories: plain/p0, plain/p1."""
    scratch = AdapterStore(tmp_path_factory.mktemp("scratch"))
    root = tmp_path_factory.mktemp("folder")
    for name in FOLDER_ADAPTERS:
        scratch.save("x", lora_adapter(200 + len(name) + int(name[-1])), 0)
        version = scratch.path_of("x")
        (root / name).mkdir(parents=True)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(version / file, root / name / file)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(twelve, folder):
    """(base URL, options) of the application on a fresh local Ray cluster."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    serve = pytest.importorskip("ray.serve", reason=NO_RAY)
    size = max(info.size for info in twelve.list())
    options = RayServeOptions(
        store=str(twelve.root), adapters_dirs=(str(folder),), model_factory=FACTORY,
        replicas=2,
        cache_mb=HELD * size / 2**20, slots=4, max_rank=8, max_batch=4,
        max_ongoing_requests=MAX_ONGOING, replica_cpus=0.5, cpu_tuning=None,
        server=ServerConfig(base_name="tiny"), name="loratree-test")
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1",
           **SLOW_HOST}
    with pytest.MonkeyPatch.context() as mp:  # the local cluster's processes inherit them
        for key, value in SLOW_HOST.items():
            mp.setenv(key, value)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(options), name=options.name, route_prefix="/")
        yield f"http://127.0.0.1:{port}", options
    finally:
        serve.shutdown()
        ray.shutdown()
