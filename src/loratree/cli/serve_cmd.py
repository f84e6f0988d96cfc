"""``loratree serve --store DIR [--adapters-dir DIR ...]``: the OpenAI-compatible HTTP
server."""

from __future__ import annotations

import argparse
import os

from loratree.cli.serve_common import add_model_args, build_engine, served_dirs
from loratree.serve.http import ServerConfig, create_app
from loratree.serve.lifecycle import ENV_FLAG
from loratree.serve.server import serve_app

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the base model and every stored adapter over "
                                     "the OpenAI API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None,
                   help="the `model` id of the bare base model (default: the model's name)")
    p.add_argument("--api-key-env", default="LORATREE_API_KEY",
                   help="environment variable holding the API key; unset: no key needed")
    p.add_argument("--max-in-flight", type=int, default=64,
                   help="requests admitted at once; more get 429 (default 64)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds before a request gets 504 (default 300)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight (default 30)")
    p.add_argument("--max-body-kb", type=int, default=1024,
                   help="largest request body in KiB; more gets 413 (default 1024)")
    p.add_argument("--admin", action="store_true",
                   help="enable POST /admin/adapters/NAME/load and .../unload (RAM cache)")
    p.add_argument("--no-web", dest="web", action="store_false",
                   help="do not serve the chat app at / (the API only)")
    p.add_argument("--adapters-dir", action="append", default=[], metavar="DIR",
                   help="also serve every PEFT adapter directory under DIR, read-only, by "
                        "its path relative to DIR (repeatable; the store wins a name both "
                        "hold); --store becomes optional")
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   default=_env_flag(os.environ.get(ENV_FLAG)),
                   help="enable vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter"
                        " (they add to and remove from the store; put an API key on the "
                        f"server); default: the {ENV_FLAG} environment variable")
    p.add_argument("--log-level", default="info")
    ray = p.add_argument_group("Ray Serve (pip install loratree[ray])")
    ray.add_argument("--ray", action="store_true",
                     help="serve through Ray Serve: --replicas engines, each with its own "
                          "cache and slots, requests routed to a replica holding the adapter")
    ray.add_argument("--replicas", type=int, default=2, help="with --ray: engines (default 2)")
    ray.add_argument("--ray-address", default=None,
                     help="with --ray: the cluster to join ('auto': the one `ray start` runs "
                          "here); default: start a local one")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.ray:
        return _run_on_ray(args)
    engine, _ = build_engine(args)
    name = args.model_name or _model_name(engine.model, args.model)
    config = _server_config(args, name)
    app = create_app(engine, config)
    where = [f"store {engine.table.cache.store.root}"] if engine.table.cache.store else []
    where += [f"adapters dir {d}" for d in args.adapters_dir]
    print(f"serving {name} and the adapters of {', '.join(where)} on http://{args.host}:"
          f"{args.port}/v1 (auth: {'API key' if config.api_key else 'none'})", flush=True)
    if config.web:
        print(f"chat app: http://{args.host}:{args.port}/", flush=True)
    serve_app(app, args.host, args.port, args.drain_timeout, args.log_level)
    return 0


def _env_flag(value: str | None) -> bool:
    """vLLM's reading of a boolean environment variable: "1" or "true", any case."""
    return (value or "").strip().lower() in ("1", "true")


def _server_config(args: argparse.Namespace, name: str) -> ServerConfig:
    return ServerConfig(base_name=name, api_key=os.environ.get(args.api_key_env) or None,
                        max_body_bytes=args.max_body_kb * 1024,
                        max_in_flight=args.max_in_flight,
                        request_timeout_s=args.request_timeout, admin=args.admin,
                        web=args.web,
                        allow_runtime_lora_updating=args.allow_runtime_lora_updating)


def _run_on_ray(args: argparse.Namespace) -> int:
    """Ray is imported only here, and a missing Ray is an error naming the extra."""
    from loratree.integrations.ray import RayServeOptions, require_ray, serve_on_ray

    require_ray()
    name = args.model_name or _model_name(None, args.model)
    store, folders = served_dirs(args)
    options = RayServeOptions(
        store=store, adapters_dirs=folders, model=args.model, replicas=args.replicas,
        cache_mb=args.cache_mb, slots=args.slots, max_rank=args.max_rank,
        max_batch=args.max_batch, cpu_tuning=args.cpu_tuning,
        server=_server_config(args, name))
    where = ([f"store {store}"] if store is not None else []) + [
        f"adapters dir {d}" for d in folders]
    print(f"serving {name} and the adapters of {', '.join(where)} from {args.replicas} Ray "
          f"Serve replicas on http://{args.host}:{args.port}/v1", flush=True)
    serve_on_ray(options, args.host, args.port, args.ray_address)
    return 0


def _model_name(model: object, given: str | None) -> str:
    if given is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(given)).removesuffix(".gguf") or "base"
