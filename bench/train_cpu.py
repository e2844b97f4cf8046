"""CPU benchmark: prefsel DPO training vs TRL's DPOTrainer, same tiny model, data and batch.

One run, one process, fp32 on CPU, the same torch thread count for every method:

  * TRL `DPOTrainer` (trl from the `bench` extra): sigmoid loss, beta 0.1, online reference
    (its default, `precompute_ref_log_probs=False`), AdamW (betas 0.9/0.95, no weight decay),
    constant learning rate, gradient clipping 1.0, `per_device_train_batch_size` = micro batch,
    `gradient_accumulation_steps` = batch / micro.
  * prefsel `train dpo`, the same settings, with the online reference, in two ways:
      - `--local-mode`: Ray Train local mode, the loop in this process (plain torch, no DeepSpeed);
      - one Ray Train worker with DeepSpeed ZeRO-2 (the default strategy) on gloo.
  * prefsel with its default `--ref-mode precompute` (reference log-probs computed once on Ray
    Data before training, no reference forward in the loop), local mode.

Model: a tiny Llama (`prefsel.tiny.build_tiny_pair`, locally trained BPE tokenizer); the policy
starts from one random model and the reference is another, so the DPO loss is not log 2 at
step 0. Data: the bundled arithmetic pairs (`prefsel.demo_data.make_demo_pairs`), one epoch.

Reported per method: optimizer steps/s and tokens/s over the training loop alone (TRL:
`train_runtime`; prefsel: the worker loop's wall time; neither includes model loading or
tokenization), and the wall time of the whole call (tokenization, model loading, Ray start-up,
reference precompute). Tokens = the tokens of the prompt+chosen and prompt+rejected sequences of
every trained pair (TRL's tokenization; the same pairs for every method, so tokens/s ratios are
steps/s ratios), although prefsel forwards each prompt once. Both train without gradient
checkpointing (TRL 1.16 turns it on unless told otherwise).

Correctness first: on the same 8 pairs, prefsel's `dpo_objective` and TRL's `compute_loss`
must give the same loss (the two tokenize identically on this data: one BOS, EOS appended,
no BPE merge across the prompt/response join), else the timings would compare different work.

    pip install -e ".[dev,bench]"                 # trl is in the bench extra
    python bench/train_cpu.py                     # 1024 pairs, batch 32, micro 8, about a minute
    python bench/train_cpu.py --pairs 512 --json /tmp/train_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import torch

from prefsel.demo_data import make_demo_pairs
from prefsel.tiny import build_tiny_pair


def trl_trainer(args, pol_dir: str, ref_dir: str, rows: list[dict], out_dir: str, *, device: str = "cpu",
                dtype: torch.dtype = torch.float32, ref_dtype: torch.dtype | None = None, bf16: bool = False,
                gradient_checkpointing: bool | None = None, sequential: bool = False, model=None, ref_model=None,
                callbacks=()):
    """TRL's DPOTrainer with the benchmark's settings (its dataset is tokenized here).

    The defaults are this script's run: CPU, fp32 weights, no mixed precision, TRL's own default
    for gradient checkpointing (None: not set; TRL turns it on), a seeded random batch order.
    bench/train_gpu.py passes the device, the weights' dtypes (`dtype` for the policy, `ref_dtype`
    for the reference, default `dtype`), `bf16` (mixed precision), checkpointing explicitly,
    `sequential` (rows in the order given, so its batches are prefsel's) and, optionally, models
    already loaded (`model`, `ref_model`) instead of loading them from the folders."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(pol_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(pol_dir, dtype=dtype)
    if ref_model is None:
        ref_model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=ref_dtype or dtype)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    extra = {}
    if gradient_checkpointing is not None:
        extra["gradient_checkpointing"] = gradient_checkpointing
    if sequential:
        if "train_sampling_strategy" not in {f.name for f in dataclasses.fields(DPOConfig)}:
            raise RuntimeError("this transformers has no TrainingArguments.train_sampling_strategy (5.x has): "
                               "TRL's batches cannot be put in prefsel's order")
        extra["train_sampling_strategy"] = "sequential"
    cfg = DPOConfig(
        output_dir=out_dir, use_cpu=device == "cpu", report_to="none", save_strategy="no", seed=args.seed,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch // args.micro_batch,
        num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        # fused AdamW on CUDA, as prefsel's make_optimizer uses there
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0,
        beta=args.beta, loss_type=["sigmoid"], max_length=None, logging_steps=args.logging_steps,
        dataloader_num_workers=0, disable_tqdm=True, bf16=bf16, fp16=False, **extra,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=data, processing_class=tok,
                         callbacks=list(callbacks) or None)
    trainer.remove_callback(PrinterCallback)  # its per-step dicts; the table reports the run
    return trainer


def trl_tokens(trainer) -> int:
    """Prompt+response tokens of the policy forwards of every pair of the trainer's dataset (its own tokenization)."""
    ds = trainer.train_dataset
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))


def train_trl(args, pol_dir, ref_dir, rows, out_dir, **trainer_kw):
    """(trainer, TrainOutput, wall seconds of the whole call): a TRL run, models loaded in the call."""
    t0 = time.perf_counter()
    trainer = trl_trainer(args, pol_dir, ref_dir, rows, out_dir, **trainer_kw)
    out = trainer.train()
    return trainer, out, time.perf_counter() - t0


def run_trl(args, pol_dir, ref_dir, rows, out_dir) -> dict:
    # TRL 1.16 turns gradient checkpointing on by default; prefsel's default is off: compare like with like
    trainer, out, wall = train_trl(args, pol_dir, ref_dir, rows, out_dir, gradient_checkpointing=False)
    steps = trainer.state.global_step
    loop = out.metrics["train_runtime"]
    return {"steps": steps, "loop_s": loop, "wall_s": wall, "tokens": trl_tokens(trainer),
            "samples": steps * args.batch, "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}


def prefsel_argv(args, pol_dir, ref_dir, data_path, out_dir, *, local: bool, ref_mode: str) -> list[str]:
    """`prefsel train dpo` arguments with the benchmark's settings (TRL's, see the module docstring)."""
    argv = ["dpo", "--model", pol_dir, "--ref-model", ref_dir, "--data", data_path, "--output", out_dir,
            "--ref-mode", ref_mode, "--beta", str(args.beta), "--loss", "sigmoid",
            "--learning-rate", str(args.lr), "--lr-scheduler", "constant", "--lr-warmup-ratio", "0",
            "--train-batch-size", str(args.batch), "--micro-train-batch-size", str(args.micro_batch),
            "--epochs", "1", "--seed", str(args.seed), "--logging-steps", str(args.logging_steps),
            "--no-tensorboard", "--no-progress", "--no-final-checkpoint", "--cpus-per-worker", str(args.threads)]
    argv += ["--local-mode", "--strategy", "ddp"] if local else ["--strategy", "deepspeed", "--zero-stage", "2"]
    return argv


def train_prefsel(argv: list[str]) -> tuple[dict, dict, float]:
    """(summary, OUTPUT/train_result.json, wall seconds of the whole call) of one `prefsel train` run."""
    from prefsel.train.cli import add_arguments, config
    from prefsel.train.job import run_train

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config(p.parse_args(argv))
    t0 = time.perf_counter()
    s = run_train(cfg)
    wall = time.perf_counter() - t0
    with open(os.path.join(cfg.output, "train_result.json")) as f:
        res = json.load(f)
    return s, res, wall


def run_prefsel(args, pol_dir, ref_dir, data_path, out_dir, *, local: bool, ref_mode: str) -> dict:
    s, res, wall = train_prefsel(prefsel_argv(args, pol_dir, ref_dir, data_path, out_dir, local=local,
                                              ref_mode=ref_mode))
    return {"steps": res["steps_this_run"], "loop_s": res["wall_s"], "wall_s": wall,
            "tokens": int(res["tokens_this_run"]), "samples": res["samples"],
            "final_loss": s["final_metrics"].get("loss"),
            "reference_precompute_s": s.get("reference_precompute_s")}


def prefsel_rows(tokenizer_dir: str, data_path: str) -> list[dict]:
    """prefsel's training rows of `data_path` (its tokenization, `prefsel train`'s defaults), by row_id."""
    from prefsel.models import load_tokenizer
    from prefsel.tokenization import PairTokenizer
    from prefsel.train.data import load_rows

    tok = load_tokenizer(tokenizer_dir)
    return sorted(load_rows(data_path, "dpo", PairTokenizer(tok, "auto", 2048, "reject")).rows,
                  key=lambda r: r["row_id"])


def same_loss_check(args, pol_dir, ref_dir, data_path, trainer, n: int = 8, *, dtype: str = "float32",
                    device: str = "cpu", rows: list[dict] | None = None, policy=None, ref=None,
                    layout=None) -> tuple[float, float]:
    """prefsel's dpo_objective vs TRL's compute_loss on the first n pairs (policy != reference).

    `rows`: prefsel's rows in the order of the trainer's dataset (default: by row_id, the order
    this script gives TRL); `policy` / `ref`: models already loaded (default: loaded here in
    `dtype` on `device`); `layout`: prefsel.packing.Layout (default: the packed default)."""
    from prefsel.models import load_causal_lm, load_tokenizer
    from prefsel.train.objectives import LogpModule, dpo_objective

    tok = load_tokenizer(pol_dir)
    rows = (rows if rows is not None else prefsel_rows(pol_dir, data_path))[:n]
    policy = policy if policy is not None else load_causal_lm(pol_dir, dtype=dtype, device=device)
    ref = ref if ref is not None else load_causal_lm(ref_dir, dtype=dtype, device=device)
    kw = {"layout": layout} if layout is not None else {}
    with torch.no_grad():
        ours, _ = dpo_objective(rows, LogpModule(policy), ref, tok.pad_token_id, beta=args.beta,
                                loss_type="sigmoid", label_smoothing=0.0, device=device, **kw)
        cols = ("prompt_ids", "chosen_ids", "rejected_ids")
        ds = trainer.train_dataset
        batch = trainer.data_collator([{c: ds[i][c] for c in cols} for i in range(n)])
        trainer.model.eval()
        theirs = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    return float(ours), float(theirs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1024, help="training pairs, one epoch (default 1024)")
    ap.add_argument("--batch", type=int, default=32, help="global batch per optimizer step (default 32)")
    ap.add_argument("--micro-batch", type=int, default=8, help="pairs per forward (default 8)")
    ap.add_argument("--hidden", type=int, default=128, help="model hidden size (default 128)")
    ap.add_argument("--layers", type=int, default=2, help="model layers (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for every method (default 2)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--logging-steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="also write all numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.batch % args.micro_batch:
        ap.error("--batch must be a multiple of --micro-batch")

    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # a table, not bars, is the output
    load_start = os.getloadavg()[0]
    rows = make_demo_pairs(args.pairs, seed=args.seed, mislabeled=0.0)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pol_dir, ref_dir = build_tiny_pair(tmp, seed=args.seed, hidden_size=args.hidden, num_layers=args.layers,
                                           intermediate_size=2 * args.hidden)
        data_path = os.path.join(tmp, "pairs.jsonl")
        with open(data_path, "w") as f:
            for r in rows:
                f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")

        check = trl_trainer(args, pol_dir, ref_dir, rows[:16], os.path.join(tmp, "trl-check"))
        n_params = sum(p.numel() for p in check.model.parameters())
        ours, theirs = same_loss_check(args, pol_dir, ref_dir, data_path, check)
        print(f"same-batch check (8 pairs, policy != reference): prefsel loss {ours:.7f}, TRL loss {theirs:.7f}, "
              f"|diff| {abs(ours - theirs):.1e}")
        if abs(ours - theirs) > 1e-4:
            print("the two trainers compute different losses on the same batch: timings not comparable")
            return 1

        results["TRL DPOTrainer"] = run_trl(args, pol_dir, ref_dir, rows, os.path.join(tmp, "trl"))
        results["prefsel local mode"] = run_prefsel(args, pol_dir, ref_dir, data_path, os.path.join(tmp, "p-local"),
                                                    local=True, ref_mode="online")
        results["prefsel Ray worker ZeRO-2"] = run_prefsel(args, pol_dir, ref_dir, data_path,
                                                           os.path.join(tmp, "p-ds"), local=False, ref_mode="online")
        results["prefsel local, ref precompute"] = run_prefsel(args, pol_dir, ref_dir, data_path,
                                                               os.path.join(tmp, "p-pre"), local=True,
                                                               ref_mode="precompute")

    import trl

    print()
    print(f"prefsel DPO training benchmark: {args.pairs} arithmetic pairs, 1 epoch, batch {args.batch} "
          f"(micro {args.micro_batch} x {args.batch // args.micro_batch} accumulation), tiny Llama (hidden "
          f"{args.hidden}, {args.layers} layers, {n_params / 1e3:.0f}k params), fp32 on CPU, {args.threads} threads")
    print(f"torch {torch.__version__}, trl {trl.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load_start:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end")
    print()
    base = results["TRL DPOTrainer"]
    print(f"{'method':<32} {'steps':>5} {'steps/s':>8} {'tokens/s':>9} {'loop s':>7} {'call s':>7} "
          f"{'steps/s vs TRL':>14} {'final loss':>10}")
    for name, m in results.items():
        sps, tps = m["steps"] / m["loop_s"], base["tokens"] / m["loop_s"]
        m.update(steps_per_s=sps, tokens_per_s=tps)
        ratio = sps / (base["steps"] / base["loop_s"])
        loss = f"{m['final_loss']:.4f}" if isinstance(m.get("final_loss"), (int, float)) else "n/a"
        print(f"{name:<32} {m['steps']:>5} {sps:>8.2f} {tps:>9.0f} {m['loop_s']:>7.1f} {m['wall_s']:>7.1f} "
              f"{ratio:>13.2f}x {loss:>10}")
    print("loop s: the training loop alone; call s: the whole call (tokenization, model loading, Ray start-up, "
          f"reference precompute). tokens: {base['tokens']} prompt+response tokens of the pairs' two sequences "
          f"for every method (prefsel forwarded {results['prefsel local mode']['tokens']}: each prompt once).")
    print("final loss: the last logged window's mean; the two draw their batches in different orders.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args) | {"params": n_params, "trl": trl.__version__,
                                               "torch": torch.__version__},
                       "same_batch_loss": {"prefsel": ours, "trl": theirs}, "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
