"""The scoring job: pairs -> policy and reference log-probs -> reward gaps, one shard per chunk.

A job on the shared skeleton (prefsel.jobs): read tasks validate and tokenize each chunk's rows
(prefsel.prepare), `ScoreActor`s hold the policy and the reference and score the usable rows
(prefsel.scoring.PairScorer), and the driver writes each finished chunk as one Parquet shard plus
its rejects (prefsel.run_output), so a rerun resumes at the first unfinished chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import pyarrow as pa

from prefsel.checks import require
from prefsel.formats import FORMATS, detect_format
from prefsel.jobs import (ActorResources, JobConfig, ModelActor, TokenizerSpec, check_attn, job_fingerprint,
                          original_record, run_chunks)
from prefsel.prepare import infer_schema, prepare_rows, record_schema
from prefsel.run_output import RunOutput, fingerprint_diff, finished_run, same_run
from prefsel.scoring import SCORE_COLUMNS, ScoreConfig
from prefsel.sources import Chunk, RawRow, absolute_local, plan_source, sample_records
from prefsel.tokenization import TRUNCATION_MODES

PREPARED_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("chunk_id", pa.int64()),
        ("record", pa.large_string()),
        ("reason", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
    ]
)
_INT_SCORES = ("chosen_tokens", "rejected_tokens", "prompt_tokens")
_SCORE_FIELDS = [(c, pa.int64() if c in _INT_SCORES else pa.float64()) for c in SCORE_COLUMNS]


@dataclass
class ScoreJobConfig(JobConfig):
    """Everything `prefsel score` needs; validated once in __post_init__.

    `scoring` (beta, token budget, padding side, ...) reaches the actors as it is; `resources`
    shapes the actor pool."""

    policy: str
    reference: str
    data: str
    output: str
    format: str | None = None  # auto-detected when None
    max_length: int | None = None  # None: the models' context
    truncation: str = "reject"
    strip_responses: bool = True  # chat responses lose outer whitespace (TRL keeps it)
    exact_continuation: bool = True  # responses tokenized as the rendered text's continuation
    attn_implementation: str = "auto"
    allow_all_rejected: bool = False  # a run that scores no row is a failure unless this is set
    scoring: ScoreConfig = field(default_factory=ScoreConfig)
    resources: ActorResources = field(default_factory=ActorResources)

    model_field = "policy"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("policy", "reference", "tokenizer", "data"):
            setattr(self, name, absolute_local(getattr(self, name)))
        require((self.format is None or self.format in FORMATS, f"format: must be one of {FORMATS}"),
                (self.format != "multi", "format: multi holds many responses per prompt; gap scoring needs pairs"),
                (self.truncation in TRUNCATION_MODES, f"truncation: must be one of {TRUNCATION_MODES}"),
                (self.max_length is None or self.max_length >= 2, "max_length: must be at least 2"))
        check_attn(self.attn_implementation, self.resources)

    @property
    def tokenizer_spec(self) -> TokenizerSpec:
        return TokenizerSpec(self.tokenizer_path, self.chat_template, self.max_length, self.truncation,
                             self.trust_remote_code, self.strip_responses, self.exact_continuation)


def fingerprint(cfg: ScoreJobConfig, files: list[str], fmt: str) -> dict:
    """What determines the scores: a rerun must match it to resume into the same output."""
    settings = ("max_length", "truncation", "strip_responses", "exact_continuation")
    return {**job_fingerprint(cfg, files, ("policy", "reference"), settings), "format": fmt, "beta": cfg.scoring.beta}


# ---- the three parts of the job ------------------------------------------------------------------


RECORD_PREFIX = "in:"  # original fields travel as typed columns under this prefix (no name clashes)


@dataclass(frozen=True)
class PreparePairs:
    """Read-task stage: validate and tokenize a chunk's rows (every row comes out); the original
    fields of usable rows become typed columns here, in parallel, not in the driver."""

    fmt: str
    tokenizer: TokenizerSpec
    schema_ipc: bytes  # the run's schema of original fields

    def __call__(self, chunk: Chunk, rows: list[RawRow]) -> pa.Table:
        schema = pa.ipc.read_schema(pa.py_buffer(self.schema_ipc))
        prepared = prepare_rows(rows, self.fmt, self.tokenizer.load(), schema)
        cols: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
        records = []
        for p in prepared:
            good = p.reason is None
            for name in PREPARED_SCHEMA.names:
                cols[name].append(chunk.chunk_id if name == "chunk_id" else getattr(p, name))
            records.append(p.fields if good else {})
            if good:
                cols["record"][-1] = None  # its fields travel typed; the text is kept for rejects only
        table = pa.Table.from_pydict(cols, schema=PREPARED_SCHEMA)
        fields = pa.Table.from_pylist(records, schema=record_schema(schema))
        for f, column in zip(fields.schema, fields.columns):
            table = table.append_column(pa.field(RECORD_PREFIX + f.name, f.type), column)
        return table


class ScoreActor(ModelActor):
    """Holds the policy and the reference; adds SCORE_COLUMNS to usable rows."""

    inputs = ("prompt_ids", "chosen_ids", "rejected_ids")
    results = pa.schema(_SCORE_FIELDS)

    def __init__(self, resources: ActorResources, cfg: ScoreJobConfig, pad_token_id: int) -> None:
        super().__init__(resources)
        from prefsel.models import check_same_vocab, load_causal_lm, load_tokenizer
        from prefsel.scoring import PairScorer

        kw = dict(dtype=cfg.dtype, device=str(self.device), trust_remote_code=cfg.trust_remote_code,
                  attn_implementation=cfg.attn_implementation)
        policy = load_causal_lm(cfg.policy, **kw)
        reference = load_causal_lm(cfg.reference, **kw)
        check_same_vocab(load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code), policy, reference)
        self.scorer = PairScorer(policy, reference, pad_token_id, cfg.scoring, self.device)
        self.forward_stats = self.scorer.stats

    def process(self, rows: list[dict]) -> list[dict]:
        from prefsel.tokenization import TokenizedExample

        return self.scorer.score(
            [TokenizedExample(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]) for r in rows]
        )


class ScoreShardWriter:
    """Driver stage: one chunk -> its Parquet shard (row_id, original fields, scores) + rejects."""

    def __init__(self, out: RunOutput, schema: pa.Schema) -> None:
        self.out = out
        self.out_schema = scores_schema(schema)

    def __call__(self, chunk_id: int, table: pa.Table) -> None:
        import pyarrow.compute as pc

        good = table.filter(pc.is_null(table["reason"]))
        bad = table.filter(pc.is_valid(table["reason"])).select(["row_id", "reason", "record"]).to_pylist()
        rejects = [{"row_id": r["row_id"], "reason": r["reason"], "record": original_record(r["record"])}
                   for r in bad]
        shard = pa.table({f.name: good[f.name if f.name == "row_id" or f.name in SCORE_COLUMNS
                                       else RECORD_PREFIX + f.name] for f in self.out_schema}).cast(self.out_schema)
        self.out.write_chunk(chunk_id, shard, rejects)


def scores_schema(schema: pa.Schema) -> pa.Schema:
    """Columns of a scores shard: row_id, the original fields, _extra, the score columns."""
    return pa.schema([("row_id", pa.int64()), *record_schema(schema), *_SCORE_FIELDS])


# ---- the job ------------------------------------------------------------------------------------


def run_score(cfg: ScoreJobConfig, *, reuse_complete: bool = False) -> dict:
    """Score every pair of `cfg.data` into `cfg.output`; returns the summary (also summary.json).

    `reuse_complete` (`prefsel select --data`): a finished output of this very fingerprint (the
    same inputs, models and settings) is kept and its summary returned, `reused` set, so the same
    command reruns its selection without scoring again, --overwrite or not; a finished output of
    another is refused naming what differs (with --overwrite, replaced)."""
    from prefsel.models import load_tokenizer, resolve_max_length
    from prefsel.summary import all_rejected_error, score_summary
    from prefsel.tokenization import rendering_note

    t0 = time.time()
    plan = plan_source(cfg.data, cfg.chunk_rows, cfg.split)
    sample = sample_records(plan)
    fmt = cfg.format or detect_format(sample)
    if fmt == "multi":
        raise ValueError("the data holds many responses per prompt (multi); gap scoring needs pairs")
    schema = plan.schema if plan.schema is not None else infer_schema(sample)
    tok = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
    pad_id = tok.pad_token_id
    # Unset: the models' context, so too long for them is a reject, not a silent score. Set: refused
    # here, before an output or an actor exists, when over the models' positions.
    cfg = replace(cfg, max_length=resolve_max_length(cfg.max_length, tok, [cfg.policy, cfg.reference],
                                                     trust_remote_code=cfg.trust_remote_code))
    fp = fingerprint(cfg, plan.files, fmt)
    prior = finished_run(cfg.output) if reuse_complete else None
    if prior is not None:
        if same_run(prior[0], fp):  # even with --overwrite: scoring again would give these scores
            return {**prior[1], "reused": True}
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.output} holds the finished scores of other inputs, models or settings "
                                  f"({fingerprint_diff(prior[0], fp, since='they were made')}); pass --overwrite "
                                  "to score again, or choose another --scores-output")
    out = RunOutput(cfg.output, fp, kind="scores", overwrite=cfg.overwrite,
                    inputs=[("--policy", cfg.policy), ("--reference", cfg.reference), ("--tokenizer", cfg.tokenizer),
                            *(("--data", f) for f in (cfg.data, *plan.files))])
    done = out.done_chunks()
    todo = [c for c in plan.chunks if c.chunk_id not in done]
    prepare = PreparePairs(fmt, cfg.tokenizer_spec, schema.serialize().to_pybytes())
    collector = run_chunks(todo, prepare, ScoreActor, dict(cfg=cfg, pad_token_id=pad_id), cfg.resources,
                           ScoreShardWriter(out, schema))
    wall = time.time() - t0
    summary = score_summary(out, plan, fmt, cfg, wall, resumed_chunks=len(done))
    summary["source_kind"] = plan.kind
    summary["rendering_note"] = rendering_note(fmt, cfg.tokenizer_spec.load(tok), sample[0] if sample else None)
    summary["rows_per_actor"] = dict(collector.rows_per_actor)
    summary["forward"] = collector.forward_summary(cfg.scoring.layout, cfg.attn_implementation)
    summary["startup_s"] = None if collector.first_write_s is None else round(collector.first_write_s, 2)
    steady = collector.steady_rows_per_s()
    summary["steady_rows_per_s"] = None if steady is None else round(steady, 1)
    summary["outputs"] = {
        "scores": f"{cfg.output.rstrip('/')}/scores",
        "rejects": f"{cfg.output.rstrip('/')}/rejects",
        "summary": f"{cfg.output.rstrip('/')}/summary.json",
    }
    failure = None if cfg.allow_all_rejected else all_rejected_error(summary)
    if failure:  # not marked complete: nothing usable came out (rejects/ says why)
        raise ValueError(f"{failure}; pass --allow-all-rejected to accept such a run")
    out.finalize(summary)
    return summary
