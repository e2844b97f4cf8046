"""Ray Serve application: reward-gap scoring over HTTP, with the batch pipeline's own code.

The request handler validates and tokenizes every pair (prefsel.formats, prefsel.tokenization)
before anything is queued, so a bad pair answers 4xx on its own request and never reaches a
batch. Good requests from concurrent clients are merged by `@serve.batch` into one
`PairScorer.score` call (token-budget batches inside); a pair's log-probs do not depend on its
batch-mates, so merging is exact. Rewards and gaps are computed per request from the log-probs
with `prefsel.gap.reward_gap`, so each request may carry its own beta.

Run it:  serve run serve.app:build_app policy=PATH reference=PATH
or       serve run serve/config.yaml          or  python -m serve.run --policy P --reference R
"""



import asyncio
import math
import os
import threading
import time
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

DEFAULT_MAX_PAIRS = 256
DEFAULT_MAX_TOKENS = 262_144
PAIR_FORMATS = ("pairs", "conversation", "hh")
RESULT_KEYS = (
    "gap",
    "chosen_reward",
    "rejected_reward",
    "chosen_logp",
    "rejected_logp",
    "chosen_ref_logp",
    "rejected_ref_logp",
    "chosen_tokens",
    "rejected_tokens",
    "prompt_tokens",
)


class GapRequest(BaseModel):
    """Body of POST /v1/gap."""

    model_config = ConfigDict(extra="forbid")

    pairs: list[dict[str, Any]] = Field(
        ..., description="preference pairs in any pair format (pairs, conversation, hh)"
    )
    beta: float | None = Field(None, gt=0, allow_inf_nan=False, description="DPO beta; server default if absent")
    format: Literal["pairs", "conversation", "hh"] | None = Field(
        None, description="force the data format; detected from the pairs when absent"
    )


class PairResult(BaseModel):
    gap: float
    chosen_reward: float
    rejected_reward: float
    chosen_logp: float
    rejected_logp: float
    chosen_ref_logp: float
    rejected_ref_logp: float
    chosen_tokens: int
    rejected_tokens: int
    prompt_tokens: int


class GapResponse(BaseModel):
    results: list[PairResult]
    model: dict[str, Any]


app = FastAPI(
    title="prefsel gap scoring",
    description="DPO implicit-reward gaps of preference pairs (Qi, Xu, Jin 2025), on demand.",
    docs_url=None,  # served below, behind the same bearer token as the API
    openapi_url=None,
    redoc_url=None,
)


def _loc_to_field(loc: tuple) -> str:
    """('body', 'pairs', 2, 'x') -> 'pairs[2].x'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "body"


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    msgs = []
    status = 422
    for e in errors[:5]:
        if e.get("type") == "json_invalid":
            status = 400
            ctx = e.get("ctx") or {}
            msgs.append(f"body: malformed JSON: {ctx.get('error', e.get('msg'))}")
            continue
        field = _loc_to_field(tuple(e.get("loc", ())))
        if e.get("type") == "missing":
            msgs.append(f"{field}: field '{field.split('.')[-1]}' missing")
        else:
            msgs.append(f"{field}: {e.get('msg')}")
    return JSONResponse(status_code=status, content={"detail": "; ".join(msgs) or "invalid request"})


@app.middleware("http")
async def _json_bodies(request: Request, call_next):
    # `curl -d '{...}'` labels its body application/x-www-form-urlencoded; the API speaks only
    # JSON, so every POST body is read as JSON whatever its label.
    if request.method == "POST":
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
        request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
    return await call_next(request)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)


class _Stats:
    """Batch-size counters of this replica (requests and pairs per scorer call)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self.pairs = 0
        self.max_batch_requests = 0
        self.max_batch_pairs = 0
        self.rejected_requests = 0
        self.batch_requests_hist: dict[int, int] = {}
        self.score_seconds = 0.0

    def add(self, n_requests: int, n_pairs: int, seconds: float) -> None:
        with self.lock:
            self.batches += 1
            self.requests += n_requests
            self.pairs += n_pairs
            self.max_batch_requests = max(self.max_batch_requests, n_requests)
            self.max_batch_pairs = max(self.max_batch_pairs, n_pairs)
            self.batch_requests_hist[n_requests] = self.batch_requests_hist.get(n_requests, 0) + 1
            self.score_seconds += seconds

    def as_dict(self) -> dict:
        with self.lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "pairs": self.pairs,
                "max_batch_requests": self.max_batch_requests,
                "max_batch_pairs": self.max_batch_pairs,
                "mean_batch_requests": self.requests / self.batches if self.batches else 0.0,
                "batch_requests_hist": {str(k): v for k, v in sorted(self.batch_requests_hist.items())},
                "rejected_requests": self.rejected_requests,
                "score_seconds": round(self.score_seconds, 4),
            }


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class GapScorer:
    """Holds a policy and a reference model; scores pairs posted to /v1/gap."""

    def __init__(
        self,
        policy: str,
        reference: str,
        tokenizer: str | None = None,
        dtype: str = "auto",
        chat_template: str = "auto",
        max_length: int | None = None,
        truncation: str = "reject",
        beta: float = 0.1,
        max_pairs_per_request: int = DEFAULT_MAX_PAIRS,
        max_tokens_per_request: int = DEFAULT_MAX_TOKENS,
        auth_token: str | None = None,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        max_tokens_per_batch: int = 16384,
        trust_remote_code: bool = False,
        device: str | None = None,
    ) -> None:
        from prefsel.models import check_same_vocab, load_causal_lm, load_tokenizer, resolve_device
        from prefsel.scoring import PairScorer, ScoreConfig
        from prefsel.tokenization import PairTokenizer

        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a positive number, got {beta}")
        if max_pairs_per_request < 1 or max_tokens_per_request < 1 or max_batch_size < 1:
            raise ValueError("max_pairs_per_request, max_tokens_per_request and max_batch_size must be positive")
        self.dev = resolve_device(device)
        kw = dict(dtype=dtype, device=str(self.dev), trust_remote_code=trust_remote_code)
        pol = load_causal_lm(policy, **kw)
        ref = load_causal_lm(reference, **kw)
        tok = load_tokenizer(tokenizer or policy, trust_remote_code=trust_remote_code)
        check_same_vocab(tok, pol, ref)
        self.pair_tokenizer = PairTokenizer(tok, chat_template, max_length, truncation)
        self.scorer = PairScorer(pol, ref, tok.pad_token_id, ScoreConfig(beta=beta, max_tokens_per_batch=max_tokens_per_batch), self.dev)
        self.info = {
            "policy": policy,
            "reference": reference,
            "tokenizer": tokenizer or policy,
            "dtype": str(next(pol.parameters()).dtype).replace("torch.", ""),
            "device": str(self.dev),
            "beta": beta,
            "max_length": max_length,
            "truncation": truncation,
            "chat_template": chat_template,
            "max_pairs_per_request": max_pairs_per_request,
            "max_tokens_per_request": max_tokens_per_request,
            "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": batch_wait_timeout_s,
        }
        self.beta = beta
        self.max_pairs = max_pairs_per_request
        self.max_tokens = max_tokens_per_request
        self.auth_token = auth_token or os.environ.get("PREFSEL_AUTH_TOKEN") or None
        self.stats = _Stats()
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # ---- helpers ------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.auth_token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token or token.strip() != self.auth_token:
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (header 'Authorization: Bearer TOKEN')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _reject(self, status: int, message: str) -> HTTPException:
        with self.stats.lock:
            self.stats.rejected_requests += 1
        return HTTPException(status_code=status, detail=message)

    def _prepare(self, body: GapRequest) -> list:
        """Validate and tokenize every pair; raise a 4xx naming the pair index and the field."""
        from prefsel.formats import RowError, detect_format, to_example

        pairs = body.pairs
        if not pairs:
            raise self._reject(422, "pairs: empty list; send at least one pair")
        if len(pairs) > self.max_pairs:
            raise self._reject(
                413, f"pairs: {len(pairs)} pairs exceed max_pairs_per_request {self.max_pairs}"
            )
        fmt = body.format
        if fmt is None:
            try:
                fmt = detect_format(pairs)
            except ValueError:
                fmt = None  # no pair is complete: each pair's own error says which field is missing
            if fmt == "multi":
                raise self._reject(
                    422, "format: multi-response rows (prompt/responses) cannot be gap-scored; send pairs"
                )
        out = []
        total = 0
        for i, row in enumerate(pairs):
            row_fmt = fmt
            if row_fmt is None:
                row_fmt = "pairs" if "prompt" in row else ("conversation" if isinstance(row.get("chosen"), list) else "hh")
            try:
                ex = to_example(row, row_fmt)
                tok = self.pair_tokenizer.encode(ex)
            except RowError as e:
                raise self._reject(422, f"pairs[{i}]: {e}") from None
            except Exception as e:  # noqa: BLE001 - any tokenizer/template failure is the pair's fault
                raise self._reject(422, f"pairs[{i}]: cannot tokenize: {type(e).__name__}: {e}") from None
            total += 2 * len(tok.prompt_ids) + len(tok.chosen_ids) + len(tok.rejected_ids)
            if total > self.max_tokens:
                raise self._reject(
                    413,
                    f"pairs[{i}]: request reaches {total} tokens (prompt+chosen+prompt+rejected summed "
                    f"over pairs 0..{i}) > max_tokens_per_request {self.max_tokens}",
                )
            out.append(tok)
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[list, float]]) -> list[list[dict]]:
        """One scorer call for the pairs of all requests in the batch; results split back."""
        from prefsel.gap import reward_gap

        flat = [p for pairs, _ in items for p in pairs]
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        # Off the event loop, so the replica keeps accepting (and validating) requests meanwhile.
        scores = await loop.run_in_executor(None, self.scorer.score, flat)
        self.stats.add(len(items), len(flat), time.perf_counter() - t0)
        results, k = [], 0
        for pairs, beta in items:
            part = []
            for s in scores[k : k + len(pairs)]:
                cr, rr, gap = reward_gap(
                    s["chosen_logp"], s["rejected_logp"], s["chosen_ref_logp"], s["rejected_ref_logp"], beta
                )
                part.append({**s, "chosen_reward": cr, "rejected_reward": rr, "gap": gap})
            k += len(pairs)
            results.append(part)
        return results

    # ---- routes -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {**self.info, "stats": self.stats.as_dict()}

    @app.get("/v1/stats")
    async def stats_route(self, request: Request) -> dict:
        self._auth(request)
        return self.stats.as_dict()

    @app.post("/v1/gap", response_model=GapResponse)
    async def gap(self, body: GapRequest, request: Request) -> dict:
        self._auth(request)
        pairs = self._prepare(body)
        beta = self.beta if body.beta is None else float(body.beta)
        scores = await self._score_batch((pairs, beta))
        return {
            "results": [{k: s[k] for k in RESULT_KEYS} for s in scores],
            "model": {"policy": self.info["policy"], "reference": self.info["reference"], "beta": beta,
                      "dtype": self.info["dtype"]},
        }

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        self._auth(request)
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        self._auth(request)
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="prefsel gap scoring")


# Arguments of GapScorer's constructor; everything else in `args` shapes the deployment.
_CTOR_ARGS = (
    "policy", "reference", "tokenizer", "dtype", "chat_template", "max_length", "truncation", "beta",
    "max_pairs_per_request", "max_tokens_per_request", "auth_token", "max_batch_size",
    "batch_wait_timeout_s", "max_tokens_per_batch", "trust_remote_code", "device",
)
_INT_ARGS = ("max_length", "max_pairs_per_request", "max_tokens_per_request", "max_batch_size", "max_tokens_per_batch")
_FLOAT_ARGS = ("beta", "batch_wait_timeout_s")


def deployment_options(args: dict) -> dict:
    """Deployment options from flat args: num_replicas, min/max_replicas, num_cpus, num_gpus, ..."""
    opts: dict = {}
    actor: dict = {}
    if args.get("num_cpus") is not None:
        actor["num_cpus"] = float(args["num_cpus"])
    if args.get("num_gpus") is not None:
        actor["num_gpus"] = float(args["num_gpus"])
    if actor:
        opts["ray_actor_options"] = actor
    if args.get("max_ongoing_requests") is not None:
        opts["max_ongoing_requests"] = int(args["max_ongoing_requests"])
    lo, hi = args.get("min_replicas"), args.get("max_replicas")
    if lo is not None or hi is not None:
        lo = int(lo if lo is not None else 1)
        hi = int(hi if hi is not None else max(lo, 1))
        if hi < lo:
            raise ValueError(f"max_replicas {hi} < min_replicas {lo}")
        opts["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": float(args.get("target_ongoing_requests") or 8),
        }
    elif args.get("num_replicas") is not None:
        opts["num_replicas"] = int(args["num_replicas"])
    return opts


def build_app(args: dict):
    """Application builder for `serve run serve.app:build_app policy=... reference=...` and config files.

    Constructor args (see GapScorer) plus optional deployment shape: num_replicas, min_replicas,
    max_replicas, target_ongoing_requests, max_ongoing_requests, num_cpus, num_gpus. In a config
    file, a `deployments:` entry for GapScorer overrides the shape.
    """
    args = dict(args or {})
    for name in ("policy", "reference"):
        if not args.get(name):
            raise ValueError(f"build_app: argument '{name}' is required (a local folder or a hub name)")
    unknown = set(args) - set(_CTOR_ARGS) - {
        "num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
        "num_cpus", "num_gpus",
    }
    if unknown:
        raise ValueError(f"build_app: unknown arguments {sorted(unknown)}")
    kwargs = {k: args[k] for k in _CTOR_ARGS if args.get(k) is not None}
    for k in _INT_ARGS:
        if k in kwargs:
            kwargs[k] = int(kwargs[k])
    for k in _FLOAT_ARGS:
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    if "trust_remote_code" in kwargs and isinstance(kwargs["trust_remote_code"], str):
        kwargs["trust_remote_code"] = kwargs["trust_remote_code"].lower() in ("1", "true", "yes")
    return GapScorer.options(**deployment_options(args)).bind(**kwargs)
