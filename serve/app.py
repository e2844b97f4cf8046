"""Ray Serve application: reward-gap scoring over HTTP, with the batch pipeline's own code.

A request to /v1/gap goes, in this order: bearer token (401, before the body is read), body size
(413 from Content-Length before reading, or while counting a chunked body), then, in a worker
thread so the event loop keeps answering /healthz: JSON and schema validation (400 / 422), the
per-field character cap (413, before tokenizing), validation and tokenization of every pair
(prefsel.formats, prefsel.tokenization; 422 naming the pair index and field) and the token caps.
Only good requests are queued: `@serve.batch` merges concurrent requests into one
`PairScorer.logprobs` call (token-budget batches inside); a pair's log-probs do not depend on its
batch-mates, so merging is exact, and a batch whose call fails is scored request by request, so
an error stays with the request that causes it. Each request's columns are then built with its own beta by
`prefsel.scoring.score_columns`, the function the batch pipeline uses.

Run it:  serve run serve.app:build_app policy=PATH reference=PATH
or       serve run serve/config.yaml          or  python -m serve.run --policy P --reference R
The arguments are `serve.run.ServeArgs` (one pydantic model: types, bounds, defaults).
"""
# No `from __future__ import annotations`: Ray Serve reads build_app's annotation as a class.

import asyncio
import copy
import hmac
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from serve.run import MAX_BETA, ScorerArgs, ServeArgs, validate_args

__all__ = ["GapRequest", "GapResponse", "ErrorResponse", "GapScorer", "ServeArgs", "bind_app", "build_app",
           "checked_args", "deployment_options"]


class GapRequest(BaseModel):
    """Body of POST /v1/gap. Strict types: `"beta": true` or `"beta": "0.5"` is a 422 (an integer
    beta is a number and is taken)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pairs: list[dict[str, Any]] = Field(
        ..., description="preference pairs in any pair format (pairs, conversation, hh)"
    )
    beta: float | None = Field(
        None, gt=0, le=MAX_BETA, allow_inf_nan=False,
        description=f"DPO beta, 0 < beta <= {MAX_BETA:g}; the server's default if absent",
    )
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


class ErrorResponse(BaseModel):
    """Every error of this API: one message naming the field (and pair index) at fault."""

    detail: str = Field(..., description="e.g. \"pairs[2]: field 'chosen': empty response\"")


_FLOAT_RESULTS = tuple(k for k, f in PairResult.model_fields.items() if f.annotation is float)
_UNAUTHORIZED = {401: {"model": ErrorResponse, "description": "missing or wrong bearer token (when the server has one)"}}
_GAP_ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed JSON or Content-Length"},
    **_UNAUTHORIZED,
    413: {"model": ErrorResponse, "description": "body over max_body_bytes, a text field over max_chars_per_field, "
          "or more pairs or tokens than max_pairs_per_request / max_tokens_per_request"},
    422: {"model": ErrorResponse, "description": "a field missing, of the wrong type or out of range, named with "
          "its pair index (pairs[2]: ...); or a pair whose scores are not finite"},
}
# The route reads its body itself (size caps and auth come first), so its schema is given here.
_GAP_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": GapRequest.model_json_schema()}}}}

app = FastAPI(
    title="prefsel gap scoring",
    description=(
        "DPO implicit-reward gaps of preference pairs (Qi, Xu, Jin 2025), on demand.\n\n"
        "The body of POST /v1/gap is read as JSON whatever its Content-Type (so `curl -d` works). "
        "Every error answers `{\"detail\": \"...\"}` (ErrorResponse): 400 malformed JSON, 401 bad or "
        "missing bearer token (checked before the body is read), 413 over a size cap (body bytes, "
        "characters per text field, pairs or tokens per request), 422 a field missing, of the wrong "
        f"type or out of range (strict types: beta is a number, 0 < beta <= {MAX_BETA:g}, not a bool "
        "or a string)."
    ),
    docs_url=None,  # served below (the replica's own schema: with the bearer scheme when it has a token)
    openapi_url=None,
    redoc_url=None,
)


def openapi_spec(bearer: bool) -> dict:
    """The app's OpenAPI schema; with `bearer`, the HTTP bearer scheme is declared and required on
    every route that checks the token (those documenting a 401)."""
    spec = copy.deepcopy(app.openapi())
    if bearer:
        spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for ops in spec["paths"].values():
            for op in ops.values():
                if "401" in op.get("responses", {}):
                    op["security"] = [{"bearer": []}]
    return spec


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


def _validation_detail(errors: list[dict]) -> tuple[int, str]:
    """(status, one-line message) of pydantic errors: 400 for malformed JSON, 422 otherwise."""
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
    return status, "; ".join(msgs) or "invalid request"


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, detail = _validation_detail(exc.errors())
    return JSONResponse(status_code=status, content={"detail": detail})


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"detail": str(exc.detail)}, headers=exc.headers)


def _text_chars(value: Any) -> int:
    """Characters of the strings in a field's value (a string, or chat messages)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return total


def _memory() -> dict:
    """This process's resident set size now and at its peak, in bytes."""
    import resource

    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}


class _Stats:
    """Batch-size counters of this replica (requests and pairs per scorer call) and its memory."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self.pairs = 0
        self.max_batch_requests = 0
        self.max_batch_pairs = 0
        self.rejected_requests = 0
        self.split_batches = 0  # batches whose merged forward failed, then scored request by request
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
                "split_batches": self.split_batches,
                "score_seconds": round(self.score_seconds, 4),
                **_memory(),
            }


def load_scorer(args: ScorerArgs):
    """(pair tokenizer, PairScorer, max_length) of a replica. With no max_length, the models'
    context is the limit: too long for them is a 4xx, not a silent score; one over their
    positions is refused (`prefsel.models.resolve_max_length`)."""
    from prefsel.models import check_same_vocab, load_causal_lm, load_tokenizer, resolve_device, resolve_max_length
    from prefsel.scoring import PairScorer, ScoreConfig
    from prefsel.tokenization import PairTokenizer

    dev = resolve_device(args.device)
    kw = dict(dtype=args.dtype, device=str(dev), trust_remote_code=args.trust_remote_code,
              attn_implementation=args.attn)
    pol = load_causal_lm(args.policy, **kw)
    ref = load_causal_lm(args.reference, **kw)
    tok = load_tokenizer(args.tokenizer or args.policy, trust_remote_code=args.trust_remote_code)
    check_same_vocab(tok, pol, ref)
    max_length = resolve_max_length(args.max_length, tok, [pol, ref])
    pair_tokenizer = PairTokenizer(tok, args.chat_template, max_length, args.truncation,
                                   strip_responses=args.strip_responses, exact_continuation=args.exact_continuation)
    config = ScoreConfig(beta=args.beta, max_tokens_per_batch=args.max_tokens_per_batch, packing=args.packing,
                         share_prompt=args.share_prompt)
    return pair_tokenizer, PairScorer(pol, ref, tok.pad_token_id, config, dev), max_length


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class GapScorer:
    """Holds a policy and a reference model; scores pairs posted to /v1/gap."""

    def __init__(self, args: ScorerArgs) -> None:
        self.pair_tokenizer, self.scorer, max_length = load_scorer(args)
        self.dev = self.scorer.device
        pol = self.scorer.policy
        self.info = {
            "policy": args.policy,
            "reference": args.reference,
            "tokenizer": args.tokenizer or args.policy,
            "dtype": str(next(pol.parameters()).dtype).replace("torch.", ""),
            "device": str(self.dev),
            "beta": args.beta,
            "max_beta": MAX_BETA,
            "max_length": max_length,
            "truncation": args.truncation,
            "chat_template": args.chat_template,
            "strip_responses": args.strip_responses,
            "exact_continuation": args.exact_continuation,
            "max_pairs_per_request": args.max_pairs_per_request,
            "max_tokens_per_request": args.max_tokens_per_request,
            "max_body_bytes": args.max_body_bytes,
            "max_chars_per_field": args.max_chars_per_field,
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
        }
        self.beta = args.beta
        self.max_pairs = args.max_pairs_per_request
        self.max_tokens = args.max_tokens_per_request
        self.max_body = args.max_body_bytes
        self.max_chars = args.max_chars_per_field
        self.auth_token = args.auth_token or os.environ.get("PREFSEL_AUTH_TOKEN") or None
        self._openapi_spec = openapi_spec(bearer=self.auth_token is not None)
        self.stats = _Stats()
        # Parsing, validation and tokenization run here, off the event loop (which keeps answering
        # /healthz and reading other bodies); one thread, as a fast tokenizer is not safe to call
        # from several threads at once.
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefsel-prepare")
        self._score_batch.set_max_batch_size(args.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    # ---- helpers ------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.auth_token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of the token matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.auth_token.encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (header 'Authorization: Bearer TOKEN')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _reject(self, status: int, message: str) -> HTTPException:
        with self.stats.lock:
            self.stats.rejected_requests += 1
        return HTTPException(status_code=status, detail=message)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 once over max_body_bytes: from Content-Length before reading
        anything, else while counting the chunks of a chunked upload."""
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise self._reject(400, f"Content-Length: not a number: {declared[:40]!r}") from None
            if n > self.max_body:
                raise self._reject(413, f"body: {n} bytes (Content-Length) exceed max_body_bytes {self.max_body}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_body:
                raise self._reject(413, f"body: over max_body_bytes {self.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, raw: bytes) -> GapRequest:
        try:
            return GapRequest.model_validate_json(raw)
        except ValidationError as e:
            status, detail = _validation_detail(e.errors(include_url=False))
            raise self._reject(status, detail) from None

    def _parse_and_prepare(self, raw: bytes) -> tuple[GapRequest, list]:
        body = self._parse(raw)
        return body, self._prepare(body)

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
        for i, row in enumerate(pairs):  # all of them, before tokenizing any
            for key, value in row.items():
                n = _text_chars(value)
                if n > self.max_chars:
                    raise self._reject(
                        413, f"pairs[{i}].{key}: {n} characters exceed max_chars_per_field {self.max_chars}"
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

    async def _score(self, items: list[tuple[list, float]]) -> list[list[dict]]:
        """One log-prob computation for the pairs of all `items` (requests); then each request's
        columns with its own beta (`score_columns`)."""
        from prefsel.scoring import score_columns

        flat = [p for pairs, _ in items for p in pairs]
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        # Off the event loop, so the replica keeps accepting (and validating) requests meanwhile.
        logps = await loop.run_in_executor(None, self.scorer.logprobs, flat)
        self.stats.add(len(items), len(flat), time.perf_counter() - t0)
        results, k = [], 0
        for pairs, beta in items:
            results.append([score_columns(p, lp, beta) for p, lp in zip(pairs, logps[k : k + len(pairs)])])
            k += len(pairs)
        return results

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[list, float]]) -> list[list[dict] | Exception]:
        """The requests Serve merged into one batch, scored together (`_score`). If that fails,
        each request is scored alone: Serve would hand the batch's exception to every request in
        it, so well-formed requests would fail because of a batch-mate. A request that fails
        alone gets its own exception back (as a result; `gap` raises it)."""
        try:
            return await self._score(items)
        except Exception:
            if len(items) == 1:
                raise
        with self.stats.lock:
            self.stats.split_batches += 1
        results: list[list[dict] | Exception] = []
        for item in items:
            try:
                results.extend(await self._score([item]))
            except Exception as e:  # noqa: BLE001 - this request's own failure, answered to it alone
                results.append(e)
        return results

    def _check_finite(self, scores: list[dict]) -> None:
        for i, s in enumerate(scores):
            for k in _FLOAT_RESULTS:
                if not math.isfinite(s[k]):
                    raise self._reject(
                        422, f"pairs[{i}]: {k} is {s[k]}: the models give this pair no finite score"
                    )

    # ---- routes -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", responses=_UNAUTHORIZED)
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {**self.info, "stats": self.stats.as_dict()}

    @app.get("/v1/stats", responses=_UNAUTHORIZED)
    async def stats_route(self, request: Request) -> dict:
        """Batching counters and the memory (rss_bytes, peak_rss_bytes) of the replica that answers."""
        self._auth(request)
        return self.stats.as_dict()

    @app.post("/v1/gap", response_model=GapResponse, responses=_GAP_ERRORS, openapi_extra=_GAP_BODY)
    async def gap(self, request: Request) -> dict:
        self._auth(request)  # before the body is read: a bad token is 401 whatever the body
        raw = await self._read_body(request)
        loop = asyncio.get_running_loop()
        body, pairs = await loop.run_in_executor(self._prepare_pool, self._parse_and_prepare, raw)
        del raw
        beta = self.beta if body.beta is None else float(body.beta)
        scores = await self._score_batch((pairs, beta))
        if isinstance(scores, Exception):  # this request failed when scored alone (`_score_batch`)
            raise scores
        self._check_finite(scores)
        return {
            "results": [{k: s[k] for k in PairResult.model_fields} for s in scores],
            "model": {"policy": self.info["policy"], "reference": self.info["reference"], "beta": beta,
                      "dtype": self.info["dtype"]},
        }

    # The schema and its docs page describe the API, not the models or any data, and are open as
    # vLLM's are: a browser loading /docs cannot send a bearer token with the page's own fetch of
    # /openapi.json. With a token, the schema declares it (securitySchemes), so "Authorize" in
    # the docs page sends it with "Try it out".
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        root = request.scope.get("root_path", "").rstrip("/")
        # under a route prefix, "Try it out" must call the prefixed routes (FastAPI's own handler
        # adds the same entry)
        return {**self._openapi_spec, "servers": [{"url": root}]} if root else self._openapi_spec

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="prefsel gap scoring")


def deployment_options(args: ServeArgs, runtime_env: dict | None = None) -> dict:
    """Deployment options from the shape fields: num_replicas, min/max_replicas, num_cpus, num_gpus, ...
    (fields left None keep the GapScorer deployment's own settings), and the replicas' runtime_env
    when one is given (a config file's application runtime_env, see serve.run)."""
    opts: dict = {}
    actor: dict = {k: float(getattr(args, k)) for k in ("num_cpus", "num_gpus") if getattr(args, k) is not None}
    if runtime_env:
        actor["runtime_env"] = runtime_env
    if actor:
        opts["ray_actor_options"] = actor
    if args.max_ongoing_requests is not None:
        opts["max_ongoing_requests"] = args.max_ongoing_requests
    if args.min_replicas is not None or args.max_replicas is not None:
        lo = args.min_replicas if args.min_replicas is not None else 1
        hi = args.max_replicas if args.max_replicas is not None else max(lo, 1)
        opts["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": float(args.target_ongoing_requests),
        }
    elif args.num_replicas is not None:
        opts["num_replicas"] = args.num_replicas
    return opts


def checked_args(args: ServeArgs | dict) -> ServeArgs:
    """ServeArgs the replicas can start with, refused (ValueError naming the field) where the app
    is built, before any replica: types, bounds and defaults (`validate_args`), and a max_length
    over the models' positions (`prefsel.models.check_max_length`, read from their configs: no
    weights loaded), which a replica would only find as a crash in its first forward."""
    from prefsel.models import check_max_length

    args = validate_args(args)
    if args.max_length is not None:
        check_max_length(args.max_length, [args.policy, args.reference], trust_remote_code=args.trust_remote_code)
    return args


def bind_app(args: ServeArgs, runtime_env: dict | None = None):
    """The GapScorer deployment bound to checked `args` (`checked_args`), its replicas in
    `runtime_env` when one is given."""
    scorer_args = ScorerArgs.model_validate(args.model_dump(include=set(ScorerArgs.model_fields)))
    return GapScorer.options(**deployment_options(args, runtime_env)).bind(scorer_args)


def build_app(args: ServeArgs):
    """Application builder for `serve run serve.app:build_app policy=... reference=...` and config files.

    Ray Serve validates the `args` into ServeArgs (serve/run.py: the replica's arguments plus the
    deployment's shape: num_replicas, min_replicas, max_replicas, target_ongoing_requests,
    max_ongoing_requests, num_cpus, num_gpus); a dict is validated here, and either is checked
    against the models (`checked_args`). In a config file, a `deployments:` entry for GapScorer
    overrides the shape, and the application's runtime_env is the replicas' (Serve applies both).
    """
    return bind_app(checked_args(args))
