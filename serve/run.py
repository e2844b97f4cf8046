"""Start the gap-scoring endpoint: `python -m serve.run --policy P --reference R` (or --config).

`serve_main(argv)` is what `prefsel serve` calls. Settings come from --config (a Ray Serve
config file such as serve/config.yaml: its first application's args, its GapScorer deployment
entry and its http_options), then flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# flag dest -> build_app argument
_APP_FLAGS = (
    "policy", "reference", "tokenizer", "dtype", "chat_template", "max_length", "truncation", "beta",
    "max_pairs_per_request", "max_tokens_per_request", "auth_token", "max_batch_size",
    "batch_wait_timeout_s", "max_tokens_per_batch",
)
_SHAPE_FLAGS = ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
                "max_ongoing_requests", "num_cpus", "num_gpus")


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(prog="prefsel serve", description="Serve reward-gap scoring over HTTP (Ray Serve).")
    )


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `prefsel serve` flags (the CLI plugin protocol of prefsel.cli)."""
    p.add_argument("--config", help="Ray Serve config file (e.g. serve/config.yaml) to read settings from")
    p.add_argument("--policy", help="policy model: local folder or hub name")
    p.add_argument("--reference", help="reference model: local folder or hub name")
    p.add_argument("--tokenizer", help="tokenizer (default: the policy's)")
    p.add_argument("--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--chat-template", dest="chat_template", help="auto, none or a template file")
    p.add_argument("--max-length", dest="max_length", type=int)
    p.add_argument("--truncation", choices=("reject", "prompt-left"))
    p.add_argument("--beta", type=float, help="default DPO beta (a request may send its own)")
    p.add_argument("--max-pairs-per-request", dest="max_pairs_per_request", type=int)
    p.add_argument("--max-tokens-per-request", dest="max_tokens_per_request", type=int)
    p.add_argument("--auth-token", dest="auth_token", help="require 'Authorization: Bearer TOKEN' "
                   "(also env PREFSEL_AUTH_TOKEN)")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, help="requests per scorer call")
    p.add_argument("--batch-wait-timeout-s", dest="batch_wait_timeout_s", type=float)
    p.add_argument("--max-tokens-per-batch", dest="max_tokens_per_batch", type=int)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--route-prefix", dest="route_prefix", help="default /")
    p.add_argument("--name", help="application name (default prefsel-gap)")
    p.add_argument("--num-gpus", dest="num_gpus", type=float, help="GPUs per replica (fractional allowed)")
    p.add_argument("--num-cpus", dest="num_cpus", type=float, help="CPUs per replica")
    p.add_argument("--num-replicas", dest="num_replicas", type=int)
    p.add_argument("--min-replicas", dest="min_replicas", type=int, help="autoscaling lower bound")
    p.add_argument("--max-replicas", dest="max_replicas", type=int, help="autoscaling upper bound")
    p.add_argument("--target-ongoing-requests", dest="target_ongoing_requests", type=float)
    p.add_argument("--max-ongoing-requests", dest="max_ongoing_requests", type=int)
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    return p


def resolve_settings(ns: argparse.Namespace) -> dict:
    """Merge --config and flags into {"app_args", "http", "name", "route_prefix"}."""
    app_args: dict = {}
    http = {"host": "127.0.0.1", "port": 8000}
    name, route_prefix = "prefsel-gap", "/"
    if ns.config:
        import yaml

        with open(ns.config) as f:
            cfg = yaml.safe_load(f) or {}
        http.update({k: v for k, v in (cfg.get("http_options") or {}).items() if k in ("host", "port")})
        apps = cfg.get("applications") or []
        if apps:
            a = apps[0]
            name = a.get("name", name)
            route_prefix = a.get("route_prefix", route_prefix)
            app_args.update(a.get("args") or {})
            for d in a.get("deployments") or []:
                if d.get("name", "GapScorer") != "GapScorer":
                    continue
                for k in ("num_replicas", "max_ongoing_requests"):
                    if d.get(k) is not None and d[k] != "auto":
                        app_args[k] = d[k]
                auto = d.get("autoscaling_config") or {}
                for k in ("min_replicas", "max_replicas", "target_ongoing_requests"):
                    if auto.get(k) is not None:
                        app_args[k] = auto[k]
                actor = d.get("ray_actor_options") or {}
                for k in ("num_cpus", "num_gpus"):
                    if actor.get(k) is not None:
                        app_args[k] = actor[k]
    for k in (*_APP_FLAGS, *_SHAPE_FLAGS):
        v = getattr(ns, k, None)
        if v is not None:
            app_args[k] = v
    if ns.num_replicas is not None and ns.min_replicas is None and ns.max_replicas is None:
        for k in ("min_replicas", "max_replicas", "target_ongoing_requests"):
            app_args.pop(k, None)  # an explicit fixed count wins over the file's autoscaling
    if ns.host:
        http["host"] = ns.host
    if ns.port is not None:
        http["port"] = ns.port
    name = ns.name or name
    route_prefix = ns.route_prefix or route_prefix
    for req in ("policy", "reference"):
        if not app_args.get(req):
            raise SystemExit(f"prefsel serve: --{req} is required (or set it in --config args)")
    return {"app_args": app_args, "http": http, "name": name, "route_prefix": route_prefix}


def serve_main(argv: list[str] | None = None) -> int:
    """Parse flags, start Ray Serve on host:port and serve until interrupted. Returns an exit code."""
    return run(build_parser().parse_args(argv))


def run(ns: argparse.Namespace) -> int:
    """Start Ray Serve with parsed flags and serve until interrupted."""
    settings = resolve_settings(ns)
    if ns.print_config:
        shown = dict(settings)
        shown["app_args"] = {k: ("***" if k == "auth_token" else v) for k, v in settings["app_args"].items()}
        print(json.dumps(shown, indent=2, default=str))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from serve.app import build_app

    app = build_app(settings["app_args"])  # validates args before Ray starts
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address) if address else ray.init()
    serve.start(http_options=settings["http"])
    print(f"prefsel serve: http://{settings['http']['host']}:{settings['http']['port']}"
          f"{settings['route_prefix'].rstrip('/')}/v1/gap (docs at /docs)", flush=True)
    try:
        serve.run(app, blocking=True, name=settings["name"], route_prefix=settings["route_prefix"])
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
