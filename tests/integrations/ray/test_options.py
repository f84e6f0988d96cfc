"""``RayServeOptions`` without Ray: bad values are named, all at once; importing the package
does not import Ray."""

import subprocess
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


def test_importing_the_package_does_not_import_ray():
    code = ("import sys, loratree.integrations.ray; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
