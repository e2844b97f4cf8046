"""Start the gap-scoring endpoint: `python -m serve.run --policy P --reference R` (or --config).

`ServeArgs` is the one definition of the application's arguments, their types, bounds and
defaults: `serve.app:build_app` takes it (Ray Serve validates a config file's `args` or
`serve run ... key=value` into it), and the `prefsel serve` flags are derived from its fields
(`max_length` -> `--max-length`), except the response-tokenization fields, whose flags are the
`prefsel score` ones (prefsel.flags.add_response_flags: --keep-response-whitespace,
--tokenize-responses-alone). It lives here rather than in serve/app.py so that building the
`prefsel` command line does not import Ray Serve and FastAPI.

`serve_main(argv)` is what `prefsel serve` calls. Settings come from --config (a Ray Serve
config file such as serve/config.yaml: proxy_location, http_options, and its one application's
name, route_prefix, args, runtime_env and GapScorer deployment entry; any other key is refused
by name, never ignored), then flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prefsel.flags import RESPONSE_FIELDS, add_response_flags, default_of
from prefsel.gap import DEFAULT_BETA
from prefsel.models import DTYPES
from prefsel.packing import ATTN_CHOICES
from prefsel.score_job import ScoreJobConfig
from prefsel.scoring import ScoreConfig
from prefsel.tokenization import TRUNCATION_MODES, check_chat_template

# Largest beta the endpoint accepts (server default or per request). DPO uses 0.01 to a few
# units; the bound keeps beta * (summed log-prob differences) finite in float64.
MAX_BETA = 1000.0


class ScorerArgs(BaseModel):
    """Arguments of the GapScorer replica: models, tokenization, scoring and request limits."""

    model_config = ConfigDict(extra="forbid")

    policy: str = Field(description="policy model: local folder or hub name")
    reference: str = Field(description="reference model: local folder or hub name")
    tokenizer: str | None = Field(None, description="tokenizer (default: the policy's)")
    dtype: Literal[tuple(DTYPES)] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    chat_template: str = Field("auto", description="auto, none or a template file")
    max_length: int | None = Field(None, ge=2, description="longest prompt+response in tokens (default: the models' context)")
    truncation: Literal[TRUNCATION_MODES] = Field("reject", description="a pair over max_length: 422 or cut the prompt's left")
    # The batch scorer's defaults and flags (--keep-response-whitespace, --tokenize-responses-alone),
    # so a `prefsel score` run made with them is reproduced over HTTP.
    strip_responses: bool = Field(default_of(ScoreJobConfig, "strip_responses"),
                                  description="chat responses lose outer whitespace (false: kept verbatim, as TRL)")
    exact_continuation: bool = Field(default_of(ScoreJobConfig, "exact_continuation"),
                                     description="responses tokenized as the rendered text's continuation "
                                                 "(false: each on its own, as TRL)")
    beta: float = Field(DEFAULT_BETA, gt=0, le=MAX_BETA, allow_inf_nan=False,
                        description="default DPO beta (a request may send its own)")
    max_pairs_per_request: int = Field(256, ge=1, description="413 above this many pairs")
    max_tokens_per_request: int = Field(262_144, ge=1, description="413 above this many tokens, summed over a request's pairs")
    max_body_bytes: int = Field(8 * 2**20, ge=1, description="413 for a body over this many bytes, before it is read")
    max_chars_per_field: int = Field(200_000, ge=1, description="413 for a text field (prompt, chosen, rejected) "
                                     "over this many characters, before tokenizing")
    auth_token: str | None = Field(None, description="require 'Authorization: Bearer TOKEN'; prefer the "
                                   "environment variable PREFSEL_AUTH_TOKEN (a flag shows in ps)")
    max_batch_size: int = Field(16, ge=1, description="requests merged into one scorer call")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_tokens_per_batch: int = Field(ScoreConfig.max_tokens_per_batch, ge=1,
                                      description="token slots (rows x row width) of one forward")
    attn: Literal[ATTN_CHOICES] = Field("auto", description="attention backend the models load with "
                                        "(auto: sdpa where supported, else eager)")
    packing: bool = Field(ScoreConfig.packing, description="several sequences per forward row, no pads inside")
    share_prompt: bool = Field(ScoreConfig.share_prompt,
                               description="a pair's prompt runs once for both responses (needs packing)")
    trust_remote_code: bool = Field(False, description="let transformers run the model repository's code")
    device: str | None = Field(None, description="torch device (default: the visible GPU, else cpu)")

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:  # before Ray starts: a missing file found in the replica leaves a deployment that never starts
            return check_chat_template(value)
        except ValueError as e:
            raise ValueError(str(e).removeprefix("chat_template: ")) from None


class ServeArgs(ScorerArgs):
    """`build_app` arguments: ScorerArgs plus the deployment's shape (None: the deployment's own
    setting, or a config file's `deployments:` entry, which wins over these)."""

    num_replicas: int | None = Field(None, ge=1, description="fixed replica count")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound (1 when only max is set)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling target per replica")
    max_ongoing_requests: int | None = Field(None, ge=1, description="requests a replica takes at once")
    num_cpus: float | None = Field(None, ge=0, description="CPUs per replica")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica (fractional allowed)")

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServeArgs:
        lo = self.min_replicas if self.min_replicas is not None else 1
        if self.max_replicas is not None and self.max_replicas < lo:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {lo}")
        return self


def validate_args(args: ServeArgs | dict | None) -> ServeArgs:
    """ServeArgs from a dict (or a ServeArgs); ValueError naming each bad field otherwise."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(dict(args or {}))
    except ValidationError as e:
        msgs = []
        for err in e.errors(include_url=False):
            field = ".".join(str(p) for p in err.get("loc", ())) or "args"
            msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
            msgs.append(f"{field}: {'required (a local folder or a hub name)' if err['type'] == 'missing' else msg}")
        raise ValueError(f"invalid serve arguments: {'; '.join(msgs)}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field_flag(group, name: str, info) -> None:
    """One flag for one ServeArgs field: its type (or choices, or --x/--no-x for bools) and help
    from the field. Flags default to None: "not given", so --config's value or the model's stays."""
    ann = info.annotation
    if get_origin(ann) in (Union, types.UnionType):  # `X | None`
        ann = next(a for a in get_args(ann) if a is not type(None))
    kw: dict = {"dest": name, "default": None}
    if ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif get_origin(ann) is Literal:
        kw["choices"] = get_args(ann)
    else:
        kw["type"] = ann
    help_ = info.description or ""
    if info.default is not None and not info.is_required() and name != "auth_token":
        help_ += f" (default {info.default})"
    group.add_argument(_flag(name), help=help_, **kw)


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(prog="prefsel serve", description="Serve reward-gap scoring over HTTP (Ray Serve).")
    )


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `prefsel serve` flags (the CLI plugin protocol of prefsel.cli): one per ServeArgs field,
    plus where to serve (--config, --host, --port, --route-prefix, --name, --print-config)."""
    p.add_argument("--config", help="Ray Serve config file (e.g. serve/config.yaml) to read settings from")
    scorer = p.add_argument_group("replica (serve.app:build_app args)")
    shape = p.add_argument_group("deployment shape")
    for name, info in ServeArgs.model_fields.items():
        if name not in RESPONSE_FIELDS:  # those two: the `prefsel score` flags, defined once
            _add_field_flag(scorer if name in ScorerArgs.model_fields else shape, name, info)
    add_response_flags(scorer, set(RESPONSE_FIELDS), unset=True)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--route-prefix", dest="route_prefix", help="default /")
    p.add_argument("--name", help="application name (default prefsel-gap)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    return p


# What `prefsel serve --config` reads of a Ray Serve config file, level by level (http_options:
# every key of Ray's HTTPOptionsSchema, passed to serve.start). Any other key is refused by name
# (once ignored: a runtime_env holding PREFSEL_AUTH_TOKEN started the endpoint without auth).
IMPORT_PATH = "serve.app:build_app"
_FILE_KEYS = ("proxy_location", "http_options", "applications")
_APP_KEYS = ("name", "route_prefix", "import_path", "args", "runtime_env", "deployments")
_DEPLOYMENT_KEYS = ("name", "num_replicas", "max_ongoing_requests", "autoscaling_config", "ray_actor_options")
_AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests")
_ACTOR_KEYS = ("num_cpus", "num_gpus", "runtime_env")


def _key_path(loc: tuple) -> str:
    """('applications', 0, 'runtime_env') -> 'applications[0].runtime_env'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _unread_keys(cfg: dict) -> list[str]:
    """Paths of the keys of a (schema-valid) Serve config that `read_config` does not read."""
    from ray.serve.schema import HTTPOptionsSchema

    unread: list[str] = []

    def extra(d: dict | None, allowed, *where) -> None:
        unread.extend(_key_path((*where, k)) for k in (d or {}) if k not in allowed)

    extra(cfg, _FILE_KEYS)
    extra(cfg.get("http_options"), HTTPOptionsSchema.model_fields, "http_options")
    for i, app in enumerate(cfg.get("applications") or []):
        if i > 0:
            unread.append(f"{_key_path(('applications', i))} (prefsel serve runs one application)")
            continue
        extra(app, _APP_KEYS, "applications", i)
        for j, d in enumerate(app.get("deployments") or []):
            where = ("applications", i, "deployments", j)
            extra(d, _DEPLOYMENT_KEYS, *where)
            extra(d.get("autoscaling_config"), _AUTOSCALING_KEYS, *where, "autoscaling_config")
            extra(d.get("ray_actor_options"), _ACTOR_KEYS, *where, "ray_actor_options")
    return unread


def read_config(path: str) -> dict:
    """The settings of a Ray Serve config file, as `resolve_settings` returns them (app_args,
    http, name, route_prefix, runtime_env, proxy_location), values absent from the file left out.

    The file is validated by Ray's own schema (ServeDeploySchema: what `serve run` accepts), then
    every key this function does not read is refused, by name, with a ValueError, as are an
    application other than serve.app:build_app, a deployment other than GapScorer and
    `num_replicas: auto` (ServeArgs has no such value)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {path}: expected a mapping (a Ray Serve config file), got {type(cfg).__name__}")
    apps = cfg.get("applications") or []
    if isinstance(apps, list):  # import_path may be left out here: it can only be serve.app:build_app
        cfg = {**cfg, "applications": [{"import_path": IMPORT_PATH, **a} if isinstance(a, dict) else a for a in apps]}
    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        raise ValueError(f"--config {path}: {_key_path(err['loc'])}: {msg}") from None
    unread = _unread_keys(cfg)
    if unread:
        raise ValueError(f"--config {path}: {', '.join(unread)}: not read by prefsel serve; remove "
                         f"{'it' if len(unread) == 1 else 'them'}, or run the file with `serve run`")
    out: dict = {"app_args": {}, "http": dict(cfg.get("http_options") or {})}
    if cfg.get("proxy_location") is not None:
        out["proxy_location"] = cfg["proxy_location"]
    if not apps:
        return out
    a = apps[0]
    if a.get("import_path", IMPORT_PATH) != IMPORT_PATH:
        raise ValueError(f"--config {path}: applications[0].import_path: prefsel serve runs {IMPORT_PATH}, "
                         f"got {a['import_path']!r}")
    out.update({k: a[k] for k in ("name", "route_prefix", "runtime_env") if a.get(k) is not None})
    app_args = out["app_args"]
    app_args.update(a.get("args") or {})
    for j, d in enumerate(a.get("deployments") or []):
        where = f"--config {path}: applications[0].deployments[{j}]"
        if d.get("name") != "GapScorer":
            raise ValueError(f"{where}.name: {d.get('name')!r}: the application's one deployment is GapScorer")
        if d.get("num_replicas") == "auto":
            raise ValueError(f"{where}.num_replicas: 'auto' is not read by prefsel serve; "
                             "set autoscaling_config min_replicas / max_replicas")
        app_args.update({k: d[k] for k in ("num_replicas", "max_ongoing_requests") if d.get(k) is not None})
        for k in ("autoscaling_config", "ray_actor_options"):
            app_args.update({key: v for key, v in (d.get(k) or {}).items() if v is not None and key != "runtime_env"})
        dep_env = (d.get("ray_actor_options") or {}).get("runtime_env")
        if dep_env:  # the replicas': the GapScorer entry's over the application's
            out["runtime_env"] = merge_runtime_env(out.get("runtime_env") or {}, dep_env)
    return out


def resolve_settings(ns: argparse.Namespace) -> dict:
    """Merge --config (`read_config`) and flags into {"app_args", "http", "name", "route_prefix",
    "runtime_env", "proxy_location"}."""
    settings = {"app_args": {}, "http": {"host": "127.0.0.1", "port": 8000}, "name": "prefsel-gap",
                "route_prefix": "/", "runtime_env": {}, "proxy_location": None}
    if ns.config:
        found = read_config(ns.config)
        settings["http"].update(found.pop("http"))
        settings.update(found)
    app_args = settings["app_args"]
    for k in ServeArgs.model_fields:  # flags given on the command line win
        v = getattr(ns, k, None)
        if v is not None:
            app_args[k] = v
    if ns.num_replicas is not None and ns.min_replicas is None and ns.max_replicas is None:
        for k in ("min_replicas", "max_replicas", "target_ongoing_requests"):
            app_args.pop(k, None)  # an explicit fixed count wins over the file's autoscaling
    if ns.host:
        settings["http"]["host"] = ns.host
    if ns.port is not None:
        settings["http"]["port"] = ns.port
    settings["name"] = ns.name or settings["name"]
    settings["route_prefix"] = ns.route_prefix or settings["route_prefix"]
    for req in ("policy", "reference"):
        if not app_args.get(req):
            raise ValueError(f"{_flag(req)} is required (or set it in --config args)")
    settings["app_args"] = validate_args(app_args).model_dump()  # types, bounds and defaults: before Ray starts
    return settings


def replica_runtime_env(app_env: dict) -> dict | None:
    """The replicas' runtime_env for a config file's application runtime_env: this Ray job's own
    (e.g. `ray job submit --runtime-env`) with the file's over it, env_vars merged one by one, as
    Serve merges an application's and a deployment's; None without one (Serve's default: the
    job's). Call it once Ray is up."""
    if not app_env:
        return None
    import ray

    return merge_runtime_env(dict(ray.get_runtime_context().runtime_env or {}), app_env)


def merge_runtime_env(parent: dict, child: dict) -> dict:
    """`child` over `parent`, key by key, but env_vars merged variable by variable: Serve's rule
    for an application's runtime_env over the job's and a deployment's over the application's."""
    env_vars = {**(parent.get("env_vars") or {}), **(child.get("env_vars") or {})}
    return {**parent, **child, **({"env_vars": env_vars} if env_vars else {})}


def serve_main(argv: list[str] | None = None) -> int:
    """Parse flags, start Ray Serve on host:port and serve until interrupted. Returns an exit code
    (2 with a one-line message for bad settings, as `prefsel serve`)."""
    try:
        return run(build_parser().parse_args(argv))
    except ValueError as e:
        print(f"prefsel serve: error: {e}", file=sys.stderr)
        return 2


def run(ns: argparse.Namespace) -> int:
    """Start Ray Serve with parsed flags and serve until interrupted."""
    settings = resolve_settings(ns)
    if ns.print_config:
        shown = dict(settings)
        shown["app_args"] = {k: ("***" if k == "auth_token" and v else v) for k, v in settings["app_args"].items()}
        env_vars = settings["runtime_env"].get("env_vars")
        if env_vars and env_vars.get("PREFSEL_AUTH_TOKEN"):
            shown["runtime_env"] = {**settings["runtime_env"], "env_vars": {**env_vars, "PREFSEL_AUTH_TOKEN": "***"}}
        print(json.dumps(shown, indent=2, default=str))
        return 0
    if getattr(ns, "auth_token", None):
        print("prefsel serve: warning: --auth-token is visible to every user of this machine (ps); "
              "prefer the environment variable PREFSEL_AUTH_TOKEN", file=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ray import serve

    from prefsel.jobs import init_ray
    from serve.app import bind_app, checked_args

    args = checked_args(settings["app_args"])  # refuses bad settings before Ray starts
    # The one way prefsel starts Ray: RAY_ADDRESS's cluster, or a local Ray whose processes listen
    # on 127.0.0.1 only. The HTTP proxy is not one of them: it binds http_options' host (--host).
    init_ray()
    app = bind_app(args, replica_runtime_env(settings["runtime_env"]))
    serve.start(http_options=settings["http"], proxy_location=settings["proxy_location"])
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
