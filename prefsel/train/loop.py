"""The Ray Train worker loop shared by DPO, HPS, RM and SFT training.

`train_loop_per_worker` runs on every worker, as named steps: setup_worker -> read_rows ->
build_engine -> restore -> train_steps -> save_final.

Every rank reads its Ray Data shard (the whole, unsplit dataset: see job.py), orders it by row_id
and follows the deterministic batch plan of prefsel.train.data, so a step's global batch does not
depend on the world size, on restarts, or on timing. A checkpoint holds the engine state
(DeepSpeed ZeRO shards or the DDP state) plus {step}; a restarted or resumed run continues at
that step with the same batches, so it ends at the same step with the same loss.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefsel.packing import Layout, layout_for, resolve_attn
from prefsel.train.config import TrainConfig, is_local_uri
from prefsel.train.data import (
    epoch_order,
    global_batch,
    hps_rng,
    rank_micro_batches,
    rows_from_shard,
)
from prefsel.train.objectives import (
    STAT_KEYS,
    LogpModule,
    RewardModule,
    chosen_tokens,
    dpo_objective,
    finish_stats,
    hps_multi_objective,
    hps_sample_pairs,
    pair_objective,
    rm_objective,
    sft_objective,
)

def build_module(cfg: TrainConfig, pad_id: int, ds_config: dict | None = None,
                 device: torch.device | None = None):
    """The trainable HF model for `device`, wrapped as LogpModule (dpo/hps/sft) or RewardModule (rm)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    keep = None
    if ds_config is not None and cfg.zero_stage == 3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        # DeepSpeed's comm must see the Ray-initialised process group before the config is read
        # (its batch-size check uses the world size).
        from prefsel.train.strategy import process_group_backend

        deepspeed.init_distributed(dist_backend=process_group_backend())  # the one Ray Train set up

        keep = HfDeepSpeedConfig(ds_config)  # from_pretrained then loads straight into ZeRO-3 shards
    kw = dict(dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
              attn_implementation=resolve_attn(cfg.attn_implementation, device))
    torch.manual_seed(cfg.seed)
    if cfg.task == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=1, **kw)
        model.config.pad_token_id = pad_id
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kw)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules or "all-linear",
            task_type="SEQ_CLS" if cfg.task == "rm" else "CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
        if keep is not None and cfg.bf16:
            # zero.Init made the base bf16, and DeepSpeed does not cast a model built under it: the
            # adapters (float32) and an RM's copied score head must match it, or ZeRO-3 refuses
            # the mixed dtypes; the float32 master copy of each trainable weight is the optimizer's
            for p in model.parameters():
                if p.is_floating_point() and not hasattr(p, "ds_id"):
                    p.data = p.data.to(torch.bfloat16)
    module = RewardModule(model) if cfg.task == "rm" else LogpModule(model)
    module._hf_ds_config = keep  # keep HfDeepSpeedConfig alive while the model lives
    return module


class Objective:
    """Picks the task's objective; the same call for training and evaluation."""

    def __init__(self, cfg: TrainConfig, ref_model, pad_id: int, device, total_steps: int,
                 model: torch.nn.Module | None = None) -> None:
        self.cfg, self.ref, self.pad, self.device, self.total = cfg, ref_model, pad_id, device, total_steps
        layout = Layout(packing=cfg.packing, share_prompt=cfg.share_prompt)
        # an online reference runs the policy's batches: the layout must be exact for both (a
        # reference of another family, ALiBi say, would refuse packed rows mid-run)
        models = [m for m in (model, ref_model) if m is not None]
        self.layout = layout_for(models, layout) if models else layout

    def sft_tokens(self, step_rows: Sequence[dict] | None) -> float | None:
        """SFT's divisor of one micro-batch's summed NLL in training: the global batch's
        chosen-response tokens T over its number of micro-batches M (train batch / micro, all
        ranks together). The engines average a step's M micro-batch losses equally (1 /
        grad_accum each, then the mean over ranks), so the step's gradient is that of
        -sum(log p) / T over the whole global batch. None (evaluation): each micro-batch's own."""
        if step_rows is None:
            return None
        return max(chosen_tokens(step_rows), 1) / (self.cfg.train_batch_size // self.cfg.micro_train_batch_size)

    def __call__(self, fn, rows, *, step: int, epoch: int, train: bool,
                 step_rows: Sequence[dict] | None = None):
        """The objective on the micro-batch `rows`; `step_rows`: in training, the step's whole
        global batch (every rank's rows), which SFT normalises by."""
        c = self.cfg
        common = dict(beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing, layout=self.layout,
                      device=self.device)
        if c.task == "rm":
            return rm_objective(rows, fn, self.pad, center_coef=c.center_coef,
                                use_margin=bool(c.margin_column), layout=self.layout, device=self.device)
        if c.task == "sft":
            return sft_objective(rows, fn, self.pad, tokens=self.sft_tokens(step_rows), layout=self.layout,
                                 device=self.device)
        if c.task == "dpo":
            return dpo_objective(rows, fn, self.ref, self.pad, **common)
        gamma = c.gamma_at(step, self.total)
        rngs = [hps_rng(c.seed, epoch, r["row_id"]) for r in rows]
        if train and c.hps_mode == "sample":
            pairs = hps_sample_pairs(rows, gamma, rngs)
            return pair_objective(rows, pairs, fn, self.ref, self.pad, **common)
        # loss mode, and evaluation of both modes: all n-1 negatives (MC subset only in training)
        return hps_multi_objective(
            rows, fn, self.ref, self.pad, gamma=gamma, scale_by_n_minus_1=c.hps_scale_n_minus_1,
            negatives=c.hps_negatives if train else None, rngs=rngs, **common,
        )


def _allreduce_stats(stats: dict, device) -> dict:
    import torch.distributed as dist

    t = torch.tensor([stats[k] for k in STAT_KEYS], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return dict(zip(STAT_KEYS, t.tolist()))


def _zero_stats() -> dict:
    return {k: 0.0 for k in STAT_KEYS}


def _add(total: dict, st: dict) -> None:
    for k in STAT_KEYS:
        total[k] += st[k]


def evaluate(engine, objective: Objective, rows: list[dict], cfg: TrainConfig, rank: int, world: int,
             step: int, device) -> dict:
    """Held-out metrics. Every rank runs the same number of forwards (ZeRO-3 gathers are collective)."""
    per = math.ceil(len(rows) / world)
    mine = rows[rank * per : (rank + 1) * per]
    n_micro = math.ceil(per / cfg.micro_train_batch_size)
    total = _zero_stats()
    engine.eval()
    with torch.no_grad():
        for k in range(n_micro):
            batch = mine[k * cfg.micro_train_batch_size : (k + 1) * cfg.micro_train_batch_size]
            dummy = not batch
            _, st = objective(engine, batch or rows[:1], step=step, epoch=0, train=False)
            if not dummy:
                _add(total, st)
    engine.train()
    out = finish_stats(_allreduce_stats(total, device))
    return {f"eval_{k}": v for k, v in out.items()}


METRICS_NAME = "metrics.jsonl"
RESULT_NAME = "train_result.json"  # the worker's numbers, which job.py reads into summary.json


def _upload(local: str, uri: str) -> None:
    """Copy a local file or folder (recursively) to `uri` on object storage."""
    from pyarrow import fs as pafs

    from prefsel.sources import filesystem_for

    dst_fs, dst = filesystem_for(uri)
    pafs.copy_files(local, dst, destination_filesystem=dst_fs)


def _download_if_exists(uri: str, local: str) -> None:
    from pyarrow import fs as pafs

    from prefsel.run_output import exists
    from prefsel.sources import filesystem_for

    src_fs, src = filesystem_for(uri)
    if exists(src_fs, src):
        pafs.copy_files(src, local, source_filesystem=src_fs)


class Logger:
    """Rank 0: console progress (tqdm), TensorBoard, wandb (optional), OUTPUT/metrics.jsonl.

    On object storage (no appends there) metrics.jsonl and tensorboard/ are written in a local
    staging folder, seeded with OUTPUT's metrics.jsonl so a resumed run appends to it, and
    uploaded to OUTPUT by `sync` (after every checkpoint) and at `close`."""

    def __init__(self, cfg: TrainConfig, rank: int, total: int, start: int) -> None:
        self.on = rank == 0
        self.tb = self.wandb = self.bar = None
        self.jsonl = None
        self.output, self.staging = cfg.output, None
        if not self.on:
            return
        folder = cfg.output
        if not is_local_uri(cfg.output):
            folder = self.staging = tempfile.mkdtemp(prefix="prefsel-logs-")
            _download_if_exists(cfg.output.rstrip("/") + "/" + METRICS_NAME, os.path.join(folder, METRICS_NAME))
        os.makedirs(folder, exist_ok=True)
        self.jsonl = open(os.path.join(folder, METRICS_NAME), "a")
        if cfg.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(folder, "tensorboard"))
        if cfg.use_wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, config=cfg.to_dict(),
                                    resume="allow")
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"train {cfg.task}", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.on:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        for k, v in metrics.items():
            if self.tb and isinstance(v, (int, float)):
                prefix = "eval/" if k.startswith("eval_") else "train/"
                self.tb.add_scalar(prefix + k.removeprefix("eval_"), v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['reward_accuracy']:.3f}")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def sync(self) -> None:
        """On object storage: upload the staged metrics.jsonl and tensorboard/ to OUTPUT."""
        if self.staging is None:
            return
        if self.tb:
            self.tb.flush()
        _upload(self.staging, self.output)

    def close(self) -> None:
        if self.tb:
            self.tb.flush()
            self.tb.close()
        if self.jsonl:
            self.jsonl.close()
        if self.staging is not None:
            _upload(self.staging, self.output)
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.bar is not None:
            self.bar.close()
        if self.wandb:
            self.wandb.finish()


def rng_state(device: torch.device) -> dict:
    """torch's generator state: the CPU one and, on a CUDA device, that device's (dropout)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _rng_file(folder: str, rank: int) -> str:
    return os.path.join(folder, "rng", f"rank_{rank:05d}.pt")


def _save_checkpoint(w: Worker, engine, step: int, metrics: dict, keep: bool = True) -> None:
    """ray.train.report(metrics) with this step's checkpoint; metrics only when `keep` is False
    or in local mode (which keeps no checkpoints). Every rank adds its torch RNG state, so the
    dropout masks after a restart are those of the uninterrupted run."""
    import ray.train

    cfg = w.cfg
    if cfg.local_mode or not keep:
        ray.train.report(metrics)
        return
    d = tempfile.mkdtemp(prefix=f"prefsel-ckpt-{w.rank}-")
    try:
        engine.save(os.path.join(d, "state"), {"step": step})
        os.makedirs(os.path.dirname(_rng_file(d, w.rank)))
        torch.save(rng_state(w.device), _rng_file(d, w.rank))
        if w.rank == 0:
            with open(os.path.join(d, "train_state.json"), "w") as f:
                json.dump({"step": step, "task": cfg.task, "strategy": cfg.strategy, "metrics": metrics}, f,
                          default=float)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- the worker's steps, in the order train_loop_per_worker runs them ---------------------------


@dataclass
class Worker:
    """One Ray Train worker's place in the run (setup_worker)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    pad_id: int
    steps_per_epoch: int
    total_steps: int  # epochs x steps per epoch: the length of the LR and gamma schedules
    last_step: int  # where this run stops: total_steps, or --max-steps
    has_eval: bool


def setup_worker(config: dict) -> Worker:
    """The run's config and this worker's rank and device; CPU threads and seeds set."""
    import ray.train

    cfg = TrainConfig.from_dict(config["cfg"])
    meta = config["meta"]
    ctx = ray.train.get_context()
    from prefsel.train.strategy import worker_device

    device = worker_device(cfg.use_gpu)  # the CPU where a GPU worker finds no CUDA (a simulated GPU node)
    if device.type == "cpu" and not cfg.local_mode:  # local mode shares the caller's process: leave its threads alone
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    total = meta["total_steps"]
    return Worker(
        cfg=cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
        pad_id=meta["pad_token_id"], steps_per_epoch=meta["steps_per_epoch"], total_steps=total,
        last_step=min(total, cfg.max_steps) if cfg.max_steps else total, has_eval=meta["has_eval"],
    )


def read_rows(w: Worker) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): the whole sets from this worker's Ray Data shards, by row_id."""
    import ray.train

    rows = rows_from_shard(ray.train.get_dataset_shard("train"))
    eval_rows = rows_from_shard(ray.train.get_dataset_shard("eval")) if w.has_eval else []
    return rows, eval_rows


def load_reference(cfg: TrainConfig, device) -> torch.nn.Module:
    """--ref-mode online: the frozen reference, in cfg.reference_dtype (as the precompute's)."""
    from prefsel.models import load_causal_lm

    return load_causal_lm(cfg.reference_path, dtype=cfg.reference_dtype, device=str(device),
                          trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)


def build_engine(w: Worker):
    """(engine, objective): the trainable module in its --strategy engine, and the task's
    objective (holding the online reference, if any)."""
    from prefsel.train.strategy import deepspeed_config, make_engine

    cfg = w.cfg
    # The reference first: under ZeRO-3, build_module keeps an HfDeepSpeedConfig alive (so the
    # policy loads straight into shards), and every from_pretrained after it loads under
    # deepspeed.zero.Init too; a reference loaded then would be partitioned, never gathered
    # (it is no DeepSpeed engine's module), and its forward would fail.
    ref = load_reference(cfg, w.device) if cfg.needs_reference and cfg.ref_mode == "online" else None
    module = build_module(cfg, w.pad_id, deepspeed_config(cfg) if cfg.strategy == "deepspeed" else None, w.device)
    engine = make_engine(cfg, module, w.total_steps, w.device)
    return engine, Objective(cfg, ref, w.pad_id, w.device, w.total_steps, model=module.model)


def restore(w: Worker, engine) -> tuple[int, dict]:
    """(the step to start at, the metrics reported with its checkpoint): (0, {}), or Ray Train's
    latest checkpoint, loaded into `engine` with this rank's RNG state (a restart after a
    failure, or --resume)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, {}
    with ckpt.as_directory() as d:
        step = int(engine.load(os.path.join(d, "state"))["step"])
        if os.path.exists(_rng_file(d, w.rank)):  # absent in checkpoints of older versions
            set_rng_state(torch.load(_rng_file(d, w.rank), weights_only=False), w.device)
        state = Path(d, "train_state.json")  # rank 0's, in every rank's copy of the checkpoint
        saved = (json.loads(state.read_text()).get("metrics") or {}) if state.exists() else {}
    return step, saved


def train_one_step(w: Worker, engine, objective: Objective, rows: list[dict], order: np.ndarray,
                   step: int, window: dict) -> tuple[float | None, float]:
    """One optimizer step: this rank's micro-batches of the step's global batch (accumulated);
    their stats are added into `window`. Returns (the grad norm, the learning rate the step
    used: read before the update, as the scheduler moves on after it)."""
    cfg = w.cfg
    epoch, k = divmod(step, w.steps_per_epoch)
    plan = global_batch(order, k, cfg.train_batch_size)
    step_rows = [rows[j] for j in plan]
    mbs = rank_micro_batches(plan, w.rank, w.world, cfg.micro_train_batch_size)
    lr = engine.lr
    grad_norm = None
    for i, idx in enumerate(mbs):
        boundary = i == len(mbs) - 1
        batch = [rows[j] for j in idx]
        with engine.accumulate(boundary):
            loss, st = objective(engine, batch, step=step, epoch=epoch, train=True, step_rows=step_rows)
            norm = engine.backward_step(loss, boundary)
        if norm is not None:
            grad_norm = norm
        _add(window, st)
    return grad_norm, lr


def train_steps(w: Worker, engine, objective: Objective, rows: list[dict], eval_rows: list[dict],
                start: int, logger: Logger, on_step_end: Callable[[int, int], None] | None = None):
    """Steps start .. last_step. After step s (counted from 1): metrics every --logging-steps,
    evaluation every --eval-steps, a checkpoint every --save-steps, all three at the last step
    (its checkpoint unless --no-final-checkpoint);
    then on_step_end(s, rank) if given. Returns (the last metrics, tokens trained on)."""
    cfg = w.cfg
    engine.train()
    window, t_window, tokens = _zero_stats(), time.time(), 0.0
    metrics: dict = {"step": start}
    order_epoch, order = -1, None
    for step in range(start, w.last_step):
        epoch = step // w.steps_per_epoch
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(rows), cfg.seed, epoch), epoch
        grad_norm, lr = train_one_step(w, engine, objective, rows, order, step, window)
        done = step + 1
        logger.advance()
        if done % cfg.logging_steps == 0 or done == w.last_step:
            agg = _allreduce_stats(window, w.device)
            tokens += agg["tokens"]
            metrics = {
                "step": done, "epoch": done / w.steps_per_epoch, **finish_stats(agg), "lr": lr,
                "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                "tokens_per_s": agg["tokens"] / max(time.time() - t_window, 1e-9),
            }
            if cfg.task == "hps":
                metrics["gamma"] = cfg.gamma_at(step, w.total_steps)
            logger.log(done, metrics)
            window, t_window = _zero_stats(), time.time()
        if eval_rows and ((cfg.eval_steps and done % cfg.eval_steps == 0) or done == w.last_step):
            ev = evaluate(engine, objective, eval_rows, cfg, w.rank, w.world, step, w.device)
            metrics.update(ev)
            logger.log(done, ev)
        at_save = bool(cfg.save_steps) and done % cfg.save_steps == 0
        if at_save or done == w.last_step:
            _save_checkpoint(w, engine, done, {**metrics, "step": done}, keep=at_save or cfg.final_checkpoint)
            logger.sync()
        if on_step_end is not None:
            on_step_end(done, w.rank)
    return metrics, tokens


def save_final(w: Worker, engine) -> str | None:
    """OUTPUT/final: the trained model (LoRA merged) and its tokenizer, saved by rank 0; the
    full weights are gathered first (collective for ZeRO-3). Returns its URI on rank 0."""
    cfg = w.cfg
    sd = engine.full_state_dict()
    if w.rank != 0:
        return None
    from prefsel.models import load_tokenizer

    hf = engine.module.model
    sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if cfg.lora_rank:
        hf.load_state_dict(sd, strict=False)
        hf = hf.merge_and_unload()
        sd = hf.state_dict()
    final = cfg.output.rstrip("/") + "/final"
    local = final if is_local_uri(final) else tempfile.mkdtemp(prefix="prefsel-final-")
    os.makedirs(local, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    hf.save_pretrained(local, state_dict=sd, safe_serialization=True)
    load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code).save_pretrained(local)
    if local != final:
        _upload(local, final)
        shutil.rmtree(local, ignore_errors=True)
    return final


def peak_memory(device) -> dict:
    """This process's peak memory so far, in GiB: its max RSS and, on a CUDA device, torch's peak
    allocation there (torch.cuda.max_memory_allocated; what the caching allocator reserves beyond
    it is not counted)."""
    import resource

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if torch.device(device).type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def write_result(w: Worker, metrics: dict, start: int, wall: float, tokens: float, final: str | None) -> None:
    """Rank 0: OUTPUT/train_result.json (local or object storage), which job.py reads into the
    run's summary (with rank 0's peak memory, `peak_memory`)."""
    from prefsel.run_output import write_text
    from prefsel.sources import filesystem_for

    cfg = w.cfg
    if w.rank != 0:
        return
    fs, out = filesystem_for(cfg.output)
    write_text(fs, out.rstrip("/") + "/" + RESULT_NAME, json.dumps(
        {"final_metrics": metrics, "steps": w.last_step, "resumed_from": start,
         "steps_this_run": w.last_step - start, "wall_s": wall, "tokens_this_run": tokens,
         "tokens_per_s": tokens / wall if wall > 0 else None,
         "samples": (w.last_step - start) * cfg.train_batch_size, "final_model": final,
         **peak_memory(w.device)}))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point, run by every worker.

    config: {"cfg": TrainConfig.to_dict(), "meta": {pad_token_id, steps_per_epoch, total_steps,
    has_eval}} (job.py). Tests may add "on_step_end": a callable (step, rank) run after every
    step's checkpoint (tests/test_train.py kills a worker with it); production runs never set it.
    """
    w = setup_worker(config)
    rows, eval_rows = read_rows(w)
    engine, objective = build_engine(w)
    start, saved = restore(w, engine)
    logger = Logger(w.cfg, w.rank, w.last_step, start)
    t0 = time.time()
    metrics, tokens = train_steps(w, engine, objective, rows, eval_rows, start, logger,
                                  config.get("on_step_end"))
    wall = time.time() - t0
    if start >= w.last_step:  # resumed a finished run: report what its last step reported
        metrics = {**metrics, **saved}
        if eval_rows and not saved:  # a checkpoint of an older version: evaluate as that step did
            metrics.update(evaluate(engine, objective, eval_rows, w.cfg, w.rank, w.world, w.last_step - 1, w.device))
    final = save_final(w, engine)
    write_result(w, metrics, start, wall, tokens, final)
    logger.close()
