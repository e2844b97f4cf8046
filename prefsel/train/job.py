"""The Ray layer of training: read + tokenize the data, precompute reference log-probs on Ray Data,
then run the worker loop on a Ray Train (V2) TorchTrainer.

Data feeding: the tokenized rows go to the trainer as Ray Datasets; every worker reads its
`ray.train.get_dataset_shard(...)` with DataConfig(datasets_to_split=[]), i.e. the WHOLE
(already tokenized, small: token ids only) dataset, and takes its part of each global batch
from a seeded plan. This keeps the batch order a pure function of (seed, epoch, step), which
exact resume and the DDP / ZeRO equivalence rely on. (A streaming split would make the order
depend on timing.)
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable

from prefsel.train.config import TrainConfig, is_local_uri


def _sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


WORKER_CHOSEN_BACKEND = "prefsel-auto"  # decided by the workers when the process group starts


def _worker_backend_torch_config():
    """Ray Train's TorchConfig whose process-group backend the workers decide when it starts:
    nccl when every worker sees CUDA, gloo when none does (strategy.backend_for_workers).
    TorchTrainer turns TorchConfig(backend=None) into nccl from the GPU *resources* asked for,
    which fails on a node that has a GPU resource but no CUDA (a simulated GPU node, CPU-only
    torch). With real GPUs this is nccl, as before."""
    import dataclasses

    from ray.train.torch.config import TorchConfig, _TorchBackend

    from prefsel.train.strategy import backend_for_workers

    class _WorkerChosenBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            if backend_config.backend == WORKER_CHOSEN_BACKEND:
                backend = backend_for_workers(list(worker_group.execute(_sees_cuda)))
                backend_config = dataclasses.replace(backend_config, backend=backend)
            super().on_start(worker_group, backend_config)

    class WorkerBackendTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _WorkerChosenBackend

    return WorkerBackendTorchConfig(backend=WORKER_CHOSEN_BACKEND)


def _holds_files(uri: str) -> bool:
    """True when the folder at `uri` (local path or s3:// / gs://) exists and holds anything."""
    from pyarrow import fs as pafs

    from prefsel.sources import filesystem_for

    fs, path = filesystem_for(uri)
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def _delete_folder(uri: str) -> None:
    from prefsel.sources import filesystem_for

    fs, path = filesystem_for(uri)
    fs.delete_dir(path)


# ---- what a resumed run must share with the run it continues ---------------------------------

FINGERPRINT = "prefsel_fingerprint.json"  # in the Ray Train run folder, beside the checkpoints

# The settings that decide a run's trajectory: the data and its order (seed, batch), the
# objective, the optimizer and its schedule (epochs set the schedule; --max-steps only stops, so
# a resume may raise it), and what a checkpoint's layout depends on. How a run is executed
# (micro-batch, packing, attention, offload, logging, eval, checkpoint cadence) may change.
TRAJECTORY_SETTINGS = (
    "task", "format", "split", "max_length", "truncation", "margin_column", "bf16",
    "lora_rank", "lora_alpha", "lora_dropout", "target_modules",
    "learning_rate", "weight_decay", "adam_betas", "lr_scheduler", "min_lr_ratio", "lr_warmup_ratio",
    "max_norm", "epochs", "train_batch_size", "seed",
    "beta", "loss_type", "label_smoothing", "center_coef", "hps_mode", "gamma", "gamma_start", "gamma_end",
    "hps_negatives", "hps_scale_n_minus_1", "strategy", "zero_stage",
)
# The rest of TrainConfig: inputs stamped by content instead (model, data, ref_model, tokenizer,
# chat_template), or free to change on resume. A new field must join one of the two lists
# (tests/test_train_guarantees.py checks that they cover TrainConfig).
RESUMABLE_SETTINGS = (
    "model", "data", "ref_model", "tokenizer", "chat_template", "output", "trust_remote_code",
    "gradient_checkpointing", "attn_implementation", "packing", "share_prompt", "eval_data", "eval_split",
    "max_steps", "micro_train_batch_size", "ref_mode", "ref_batch_tokens", "ref_actors",
    "offload_optimizer", "offload_param", "num_workers", "use_gpu", "cpus_per_worker", "local_mode",
    "logging_steps", "eval_steps", "save_steps", "final_checkpoint", "keep_checkpoints", "use_tensorboard",
    "use_wandb", "wandb_project", "progress", "storage_path", "run_name", "resume", "overwrite", "max_failures",
)


def train_fingerprint(cfg: TrainConfig) -> dict:
    """What a --resume must match: the data's stamp, the models' and tokenizer's stamps, the chat
    template, TRAJECTORY_SETTINGS, and the worker count under ZeRO (each rank restores its own
    optimizer partition; DeepSpeed cannot re-partition them for another count)."""
    from prefsel.jobs import chat_template_stamp, input_stamps, model_stamp
    from prefsel.sources import data_files

    d = cfg.to_dict()
    return {
        "data": input_stamps(data_files(cfg.data)),
        "model": model_stamp(cfg.model),
        **({"ref_model": model_stamp(cfg.reference_path)} if cfg.needs_reference else {}),
        "tokenizer": model_stamp(cfg.tokenizer_path),
        "chat_template": chat_template_stamp(cfg.chat_template),
        **{k: d[k] for k in TRAJECTORY_SETTINGS},
        **({"num_workers": cfg.num_workers} if cfg.strategy == "deepspeed" and cfg.zero_stage >= 1 else {}),
    }


def _check_resumed_run(cfg: TrainConfig, fingerprint: Callable[[], dict]) -> None:
    """Refuse a --resume whose settings differ from those the run was started with: Ray Train
    would restore its checkpoint and train on, a mix of two runs under one name. A run folder
    without a fingerprint (no run there yet, or one of an older prefsel) passes. `fingerprint`
    gives this run's (`train_fingerprint`), computed only when there is one to compare."""
    from prefsel.run_output import exists, fingerprint_diff, read_json
    from prefsel.sources import filesystem_for

    fs, run = filesystem_for(cfg.run_uri)
    path = posixpath.join(run, FINGERPRINT)
    if not exists(fs, path):
        return
    old, new = read_json(fs, path), fingerprint()
    if old != new:
        changes = fingerprint_diff(old, new, since="it started")
        raise ValueError(f"--resume: the run in {cfg.run_uri} was started with other settings ({changes}); "
                         "pass the flags it was started with, or --overwrite to start afresh")


def _write_fingerprint(cfg: TrainConfig, fingerprint: dict | None = None) -> None:
    """Leave `fingerprint` (default: `train_fingerprint(cfg)`) in the run folder, for a later --resume."""
    from prefsel.run_output import write_text
    from prefsel.sources import filesystem_for

    fs, run = filesystem_for(cfg.run_uri)
    fs.create_dir(run, recursive=True)
    write_text(fs, posixpath.join(run, FINGERPRINT), json.dumps(fingerprint or train_fingerprint(cfg), indent=1))


def _forget_fingerprint_without_checkpoint(cfg: TrainConfig) -> None:
    """After a failed fit: a run folder with no checkpoint has nothing to resume, so its
    fingerprint goes, and the corrected command may --resume (take over the folder) with other
    settings, as before the run started."""
    from pyarrow import fs as pafs

    from prefsel.sources import filesystem_for

    fs, run = filesystem_for(cfg.run_uri)
    held = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    if not any(posixpath.basename(i.path).startswith("checkpoint_") for i in held):
        fs.delete_file(posixpath.join(run, FINGERPRINT))


def _prepare_output(cfg: TrainConfig, fingerprint: Callable[[], dict] | None = None) -> None:
    """Refuse (or, with --overwrite, delete) what an earlier run left, unless --resume.

    Two places hold a run: OUTPUT (final/, metrics, summary) and Ray Train's run folder
    STORAGE/RUN_NAME (the checkpoints; OUTPUT/train by default). Ray Train V2 restores the latest
    checkpoint under the run folder by itself, so a new run pointed at a used --storage-path would
    silently continue (and export) another run's weights: both are checked, local or object
    storage alike, before anything is deleted. An OUTPUT that is, holds or lies inside an input is
    refused first."""
    from prefsel.run_output import refuse_overlap

    fingerprint = fingerprint or functools.partial(train_fingerprint, cfg)
    refuse_overlap(cfg.output, [("--model", cfg.model), ("--ref-model", cfg.ref_model), ("--tokenizer", cfg.tokenizer),
                                ("--data", cfg.data), ("--eval-data", cfg.eval_data)])
    if cfg.resume:
        _check_resumed_run(cfg, fingerprint)
        if is_local_uri(cfg.output):
            os.makedirs(cfg.output, exist_ok=True)
        return
    used = []
    if _holds_files(cfg.output):
        used.append((cfg.output, f"--output {cfg.output} is not empty: pass --resume to continue its run "
                                 "or --overwrite to replace it"))
    run = cfg.run_uri
    if not run.startswith(cfg.output.rstrip("/") + "/") and _holds_files(run):  # else deleted with OUTPUT
        used.append((run, f"the Ray Train run folder {run} (--storage-path / --run-name) already holds a run: "
                          "pass --resume to continue it or --overwrite to delete it (or choose another "
                          "--storage-path / --run-name)"))
    if used and not cfg.overwrite:
        raise FileExistsError(used[0][1])
    for uri, _ in used:
        _delete_folder(uri)
    if is_local_uri(cfg.output):
        os.makedirs(cfg.output, exist_ok=True)


def run_train(cfg: TrainConfig) -> dict:
    """Train `cfg.task` on Ray Train; returns the summary (also written to OUTPUT/summary.json)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from prefsel.models import load_tokenizer, resolve_max_length
    from prefsel.jobs import init_ray
    from prefsel.run_output import SUMMARY, exists, read_json, write_text
    from prefsel.sources import filesystem_for
    from prefsel.tokenization import PairTokenizer
    from prefsel.train.data import load_rows, precompute_reference, steps_per_epoch, to_ray_dataset
    from prefsel.train.loop import RESULT_NAME, train_loop_per_worker

    t0 = time.time()
    tok = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
    # as `prefsel score`: unset, the models' context (a longer row is a reject, never a crash in a
    # learned-position model's forward); over their positions, refused before an output is touched
    max_length = resolve_max_length(cfg.max_length, tok, [cfg.model, cfg.reference_path if cfg.needs_reference else None],
                                    trust_remote_code=cfg.trust_remote_code)
    # the data listed and the inputs stamped once (LIST calls on object storage): a resume writes
    # back the fingerprint it was checked with
    fingerprint = functools.cache(functools.partial(train_fingerprint, cfg))
    _prepare_output(cfg, fingerprint)
    ptok = PairTokenizer(tok, cfg.chat_template, max_length, cfg.truncation)
    train = load_rows(cfg.data, cfg.task, ptok, fmt=cfg.format, split=cfg.split, margin_column=cfg.margin_column)
    evald = None
    if cfg.eval_data:
        evald = load_rows(cfg.eval_data, cfg.task, ptok, fmt=cfg.format, split=cfg.eval_split,
                          margin_column=cfg.margin_column)
    spe = steps_per_epoch(len(train.rows), cfg.train_batch_size)
    if spe < 1:
        raise ValueError(
            f"{len(train.rows)} usable rows < --train-batch-size {cfg.train_batch_size}: lower the batch size"
        )
    total = spe * cfg.epochs
    init_ray()
    ds = to_ray_dataset(train.rows)
    eval_ds = to_ray_dataset(evald.rows) if evald and evald.rows else None
    t_ref = 0.0
    ref_rows_per_actor: dict = {}
    if cfg.needs_reference and cfg.ref_mode == "precompute":
        t1 = time.time()
        ds = precompute_reference(ds, cfg, tok.pad_token_id)
        ref_rows_per_actor = {k: int(v) for k, v in Counter(ds.select_columns(["actor"]).to_pandas()["actor"]).items()}
        if eval_ds is not None:
            eval_ds = precompute_reference(eval_ds, cfg, tok.pad_token_id)
        t_ref = time.time() - t1
    else:
        # Ray Data's helper actors (stats, coordinator) stay on the node of whoever runs Ray Data
        # first: the driver, not a GPU Train worker whose node could then never scale down.
        ds = ds.materialize()
    datasets = {"train": ds}
    if eval_ds is not None:
        datasets["eval"] = eval_ds
    meta = {"pad_token_id": tok.pad_token_id, "steps_per_epoch": spe, "total_steps": total,
            "has_eval": eval_ds is not None}
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "meta": meta},
        scaling_config=ScalingConfig(num_workers=0, use_gpu=cfg.use_gpu) if cfg.local_mode else
        ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        torch_config=_worker_backend_torch_config() if cfg.use_gpu else TorchConfig(backend="gloo"),
        run_config=RunConfig(
            storage_path=cfg.resolved_storage_path,
            name=cfg.run_name,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    if not cfg.local_mode:  # local mode keeps no checkpoints: nothing to resume
        _write_fingerprint(cfg, fingerprint())
    try:
        result = trainer.fit()
    except BaseException:
        if not cfg.local_mode:
            _forget_fingerprint_without_checkpoint(cfg)
        raise
    wall = time.time() - t0
    out_fs, out_dir = filesystem_for(cfg.output)
    res_path = posixpath.join(out_dir, RESULT_NAME)
    worker = read_json(out_fs, res_path) if exists(out_fs, res_path) else {}
    final_metrics = worker.get("final_metrics") or dict(result.metrics or {})
    trained = spe * cfg.train_batch_size
    summary = {
        "task": cfg.task,
        "rows_in": train.rows_in,
        "rows_used": len(train.rows),  # usable: rows_in = rows_used + rows_rejected
        # each epoch trains on full global batches only: its last partial batch (a different
        # set of rows each epoch, the order being shuffled per epoch) is left out
        "rows_trained_per_epoch": trained,
        "rows_dropped_per_epoch": len(train.rows) - trained,
        "rows_rejected": train.rows_rejected,
        "reject_reasons": dict(train.rejected),
        "eval_rows": len(evald.rows) if evald else 0,
        "format": train.fmt,
        "max_length": max_length,
        "steps": worker.get("steps", final_metrics.get("step")),
        "steps_per_epoch": spe,
        "total_steps": total,
        "resumed_from_step": worker.get("resumed_from"),
        "samples": worker.get("samples"),
        "tokens_per_s": worker.get("tokens_per_s"),
        "train_wall_s": worker.get("wall_s"),
        **{k: round(worker[k], 3) for k in ("peak_rss_gib", "peak_gpu_gib") if worker.get(k) is not None},
        "reference_precompute_s": round(t_ref, 2),
        "reference_rows_per_actor": ref_rows_per_actor,
        "wall_s": round(wall, 2),
        "final_metrics": final_metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "output": cfg.output,
        "final_model": worker.get("final_model", cfg.output.rstrip("/") + "/final"),
        "config": cfg.to_dict(),
    }
    write_text(out_fs, posixpath.join(out_dir, SUMMARY), json.dumps(summary, indent=2, default=str))
    return summary
