"""``RayServeOptions`` without Ray: bad values are named, all at once; importing the package
does not import Ray."""

import importlib
import re
import sys

import pytest

from loratree.integrations.ray import RayServeOptions


def test_bad_options_are_named_together():
    with pytest.raises(ValueError) as e:
        RayServeOptions(store="s", model="m", model_factory="nocolon", replicas=0,
                        cache_mb=0)
    for name in ("not both", "module:function", "replicas", "cache_mb"):
        assert name in str(e.value)
    assert RayServeOptions(store="s", max_batch=4).ongoing == 8
    assert RayServeOptions(store="s", max_ongoing_requests=3).ongoing == 3
    with pytest.raises(ValueError, match="nothing to serve"):
        RayServeOptions()
    with pytest.raises(ValueError, match="a tuple of folders"):
        RayServeOptions(adapters_dirs="one/folder")
    assert RayServeOptions(adapters_dirs=("f",)).store is None  # folders alone


def test_importing_the_package_does_not_import_ray(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("loratree.integrations.ray")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # any import of Ray now raises
    package = importlib.import_module("loratree.integrations.ray")
    with pytest.raises(RuntimeError, match=re.escape("pip install loratree[ray]")):
        package.build_app(package.RayServeOptions(store="s"))


def test_serve_runs_application_builder_types_its_arguments():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    from ray.serve import Application

    from loratree.integrations.ray.app import app_builder

    app = app_builder({"store": "s", "replicas": "3", "cache_mb": "64.5", "base_name": "m",
                       "cpu_tuning": "none", "admin": "true"})
    assert isinstance(app, Application)
    options = app._bound_deployment.init_args[2]  # Ingress(replicas, ledger, options)
    assert (options.replicas, options.cache_mb, options.cpu_tuning) == (3, 64.5, None)
    assert options.server.base_name == "m" and options.server.admin is True
    options = app_builder({"adapters_dirs": "f1,f2"})._bound_deployment.init_args[2]
    assert (options.store, options.adapters_dirs) == (None, ("f1", "f2"))
    with pytest.raises(ValueError, match=r"unknown argument.*replica_count"):
        app_builder({"store": "s", "replica_count": "3"})
