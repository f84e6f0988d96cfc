"""The Ray Serve application: an ingress, N loratree replicas and the load ledger.

From Python::

    from ray import serve
    from loratree.integrations.ray import RayServeOptions, build_app

    serve.run(build_app(RayServeOptions(store="adapters", replicas=2)), route_prefix="/")

or with Ray's own CLI (an application builder; arguments as ``key=value``)::

    serve run loratree.integrations.ray.app:app_builder store=adapters replicas=2

(``adapters_dirs=DIR1,DIR2`` serves plain PEFT folders beside the store, or instead of it.)
"""

from __future__ import annotations

import dataclasses

from ray import serve
from ray.serve import Application

from loratree.serve.cpu import CpuTuning
from loratree.serve.http import ServerConfig

from .ingress import Ingress
from .ledger import LoadLedger
from .options import RayServeOptions
from .replica import LoraTreeReplica

__all__ = ["app_builder", "build_app"]

HEALTH_CHECK_PERIOD_S = 5.0


def build_app(options: RayServeOptions) -> Application:
    ledger = serve.deployment(LoadLedger, name="LoadLedger", num_replicas=1,
                              ray_actor_options={"num_cpus": 0}).bind()
    replicas = serve.deployment(
        LoraTreeReplica, name="LoraTreeReplica", num_replicas=options.replicas,
        max_ongoing_requests=options.ongoing,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options={"num_cpus": options.replica_cpus}).bind(options, ledger)
    ingress = serve.deployment(
        Ingress, name="LoraTreeIngress", num_replicas=1,
        max_ongoing_requests=options.server.max_in_flight * options.replicas,
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(replicas, ledger, options)


def app_builder(args: dict[str, str]) -> Application:
    """``serve run``'s entry point: ``RayServeOptions`` and ``ServerConfig`` fields by name
    (``cpu_tuning`` as ``loratree serve --cpu-tuning`` takes it)."""
    fields = {f.name: f for f in dataclasses.fields(RayServeOptions) if f.name != "server"}
    server_fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(args) - set(fields) - set(server_fields))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(set(fields) | set(server_fields)))}")
    server = {k: _typed(server_fields[k], v) for k, v in args.items() if k in server_fields}
    given = {k: _typed(fields[k], v) for k, v in args.items() if k in fields}
    if "cpu_tuning" in given:
        given["cpu_tuning"] = CpuTuning.parse(args["cpu_tuning"])
    return build_app(RayServeOptions(**given, server=ServerConfig(**server)))


def _typed(field: dataclasses.Field, text: str) -> object:
    kind = str(field.type)
    if kind.startswith("tuple"):  # adapters_dirs=a,b
        return tuple(part for part in text.split(",") if part)
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    if kind.startswith("bool"):
        return text.lower() in ("1", "true", "yes", "on")
    return text
