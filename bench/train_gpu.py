"""GPU benchmark of DPO training: prefsel (one Ray Train worker, DeepSpeed ZeRO-2, packed) vs TRL's DPOTrainer.

The training item of the GPU issue, in one command. Random-initialised Llama-architecture policy
and reference shaped like Llama-3.2-1B (bench/_shapes.py; `--shape 8b`: Llama-3.1-8B), saved with
save_pretrained and a word-level tokenizer, so both trainers load them from folders; synthetic
text pairs, prompt uniform in [50, 450) tokens, chosen and rejected each in [100, 600). Nothing is
downloaded.

Stages (each isolated in a fresh process, so every peak is its own; prefsel's Ray worker is one):

  1. same batch: prefsel's `dpo_objective` vs TRL's `compute_loss` on the first micro-batch of the
     first step, on the device, in fp32 (tolerance 2e-3 on CUDA, 1e-4 on the CPU) and in bf16
     (tolerance 5e-2: both compute bf16 logits with float32 log-softmax, but a bf16 backbone run
     on different layouts differs by bf16 rounding over ~1000 summed tokens); the token ids of
     every pair must be the same in both tokenizations. Different ids or an fp32 failure stop the run
     before the timings; a bf16 miss is recorded (`check` in the JSON) and the run goes on.
  2. TRL DPOTrainer: sigmoid loss, beta 0.1, online reference, AdamW (0.9, 0.95, no decay, eps
     1e-8), constant lr, no warm-up, clipping 1.0, micro batch x accumulation = batch, no
     truncation (max_length None), gradient checkpointing off (TRL's default is on; on with
     `--gradient-checkpointing`, for both), the pairs in prefsel's batch order (sequential
     sampler), so step k trains on the same pairs in both. `--trl-weights`: fp32 = fp32 weights
     with bf16 autocast (mixed precision, fp32 master weights, as DeepSpeed's bf16 keeps); bf16 =
     bf16 weights and optimizer state (what `dtype="auto"` on a bf16 checkpoint gives). The
     reference is bf16 in both (prefsel's with --bf16 too).
  3. prefsel `train dpo`: the same settings, `--ref-mode online`, one Ray Train worker,
     `--strategy deepspeed --zero-stage 2`, the default layout (packed, prompts shared), `--bf16
     --use-gpu` on CUDA, `--no-final-checkpoint` (the 1B shape's optimizer state is about 21 GB).
     Ray start-up, tokenization and saving final/ are outside the loop.
  4. memory: one training step (forward + backward, no optimizer) of prefsel's DPO objective on
     4 pairs x 2 responses x 512 tokens (4096 response tokens), weights and gradients in bf16,
     peak torch allocation on the device (on the CPU: the process's peak RSS), and the share of
     it that float32 logits of every response token would take (tokens x vocabulary x 4 bytes);
     with `recompute_head` off and on where prefsel.logprobs.batch_logprobs has it.

Per method: tokens/s and steps/s over the steady loop (steps 2..N, timed at each step's end;
all steps in the JSON), peak GiB (torch.cuda.max_memory_allocated of the process that trained:
TRL's, and the Ray worker's from its train_result.json), and the first four losses. Tokens = the
logical tokens of the trained pairs, prompt+chosen and prompt+rejected (the prompt counted twice,
whatever the layout), the same numerator for both.

    python bench/train_gpu.py --json /tmp/train_gpu.json      # GPU: 1b, 256 pairs, batch 32, micro 4
    python bench/train_gpu.py --tiny                          # CPU smoke run: tiny shape, fp32 (1-2 min)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_cpu as tc  # noqa: E402
from _shapes import SHAPES, SPECIALS, save_shape_pair, shape_config, shape_rows, word_count  # noqa: E402

TOL = {("cuda", "fp32"): 2e-3, ("cpu", "fp32"): 1e-4, ("cuda", "bf16"): 5e-2, ("cpu", "bf16"): 5e-2}
STAGES = ("check", "trl", "prefsel", "memory")


# ---- helpers shared by the parent and the child processes ---------------------------------------


def _quiet(threads: int) -> None:
    """A child's set-up: torch threads, and no per-step prints or progress bars from the libraries."""
    import warnings

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


def _ns(a: dict) -> argparse.Namespace:
    return argparse.Namespace(**a)


def _cuda(a) -> bool:
    return a.device == "cuda"


def _device_name(a) -> str:
    if _cuda(a):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _free(a) -> None:
    gc.collect()
    if _cuda(a):
        torch.cuda.empty_cache()


def in_child(fn, *args):
    """fn(*args) in a fresh spawned process (its own CUDA context and peaks); its result back."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
    ok = False
    try:
        out = ex.submit(fn, *args).result()
        ok = True
        return out
    finally:
        if not ok:  # an error or a signal here (SIGTERM from a time limit): the child must not live on
            for proc in list((getattr(ex, "_processes", None) or {}).values()):
                if proc.is_alive():
                    proc.terminate()
        ex.shutdown(wait=ok, cancel_futures=True)


# ---- 1. the same-batch check ------------------------------------------------------------------


def child_check(a: dict, pol_dir: str, ref_dir: str, data_path: str, text_rows: list[dict],
                rows: list[dict], work: str) -> dict:
    """Token ids of every pair in both tokenizations, then the loss of the first micro-batch in
    each of `check_dtypes` (policy and reference in that dtype, on the device, shared by both)."""
    a = _ns(a)
    _quiet(a.threads)
    from prefsel.models import load_causal_lm
    from prefsel.packing import Layout, layout_for

    out = {"device_name": _device_name(a), "checks": []}
    for k, dt in enumerate(a.check_dtypes):
        policy = load_causal_lm(pol_dir, dtype=dt, device=a.device)
        ref = load_causal_lm(ref_dir, dtype=dt, device=a.device)
        trainer = tc.trl_trainer(a, pol_dir, ref_dir, text_rows, os.path.join(work, f"trl-check-{dt}"),
                                 device=a.device, bf16=False, gradient_checkpointing=False, sequential=True,
                                 model=policy, ref_model=ref)
        if k == 0:
            ds = trainer.train_dataset
            bad = [i for i, (p, c, r, row) in enumerate(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], rows))
                   if (list(p), list(c), list(r)) != (row["prompt_ids"], *row["response_ids"])]
            out["token_mismatches"] = len(bad)
            out["first_mismatch"] = bad[:1]
        ours, theirs = tc.same_loss_check(a, pol_dir, ref_dir, data_path, trainer, n=a.check_pairs, dtype=dt,
                                          device=a.device, rows=rows, policy=policy, ref=ref,
                                          layout=layout_for([policy], Layout()))
        tol = TOL[(a.device, dt)]
        out["checks"].append({"dtype": dt, "pairs": a.check_pairs, "prefsel": ours, "trl": theirs,
                              "abs_diff": abs(ours - theirs), "tol": tol, "ok": abs(ours - theirs) <= tol})
        del policy, ref, trainer
        _free(a)
    return out


# ---- 2. TRL ------------------------------------------------------------------------------------


def child_trl(a: dict, weights: str, pol_dir: str, ref_dir: str, text_rows: list[dict], out_dir: str) -> dict:
    """One TRL DPOTrainer run on the rows in the order given; per-step times, losses, peak memory."""
    a = _ns(a)
    _quiet(a.threads)
    from transformers import TrainerCallback

    from prefsel.train.loop import peak_memory  # what prefsel's worker reports, measured alike

    cuda = _cuda(a)

    class StepTimer(TrainerCallback):
        """Wall time at the start of the first optimizer step and at the end of each (synchronized)."""

        def __init__(self):
            self.t: list[float] = []

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            if not self.t:
                self.t.append(self._now())

        def on_step_end(self, args, state, control, **kw):
            self.t.append(self._now())

    timer = StepTimer()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights]
    trainer, res, wall = tc.train_trl(
        a, pol_dir, ref_dir, text_rows, out_dir, device=a.device, dtype=dtype,
        ref_dtype=torch.bfloat16 if cuda else torch.float32, bf16=cuda,
        gradient_checkpointing=a.gradient_checkpointing, sequential=True, callbacks=[timer])
    return {"device_name": _device_name(a), "steps": trainer.state.global_step,
            "step_s": [b - t for t, b in zip(timer.t, timer.t[1:])],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "train_runtime_s": res.metrics["train_runtime"], "wall_s": wall,
            "tokens_own_count": tc.trl_tokens(trainer), **peak_memory(a.device)}


# ---- 3. prefsel (Ray Train worker, in this process's Ray) ---------------------------------------


def run_prefsel_worker(a, pol_dir: str, ref_dir: str, data_path: str, out_dir: str, max_length: int) -> dict:
    argv = tc.prefsel_argv(a, pol_dir, ref_dir, data_path, out_dir, local=False, ref_mode="online")
    argv += ["--max-length", str(max_length)]
    if _cuda(a):
        argv += ["--bf16", "--use-gpu"]
    if a.gradient_checkpointing:
        argv += ["--gradient-checkpointing"]
    s, res, wall = tc.train_prefsel(argv)
    if s["rows_rejected"]:
        raise RuntimeError(f"prefsel rejected {s['rows_rejected']} rows: {s['reject_reasons']}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        logged = [m for m in map(json.loads, f) if "loss" in m]
    return {"steps": res["steps_this_run"],
            # each logged window is one step (--logging-steps 1): its tokens / its tokens_per_s = its seconds
            "step_s": [m["tokens"] / m["tokens_per_s"] for m in logged],
            "losses": [m["loss"] for m in logged], "loop_wall_s": res["wall_s"], "wall_s": wall,
            "tokens_forwarded": res["tokens_this_run"], "argv": argv,
            **{k: res[k] for k in ("peak_gpu_gib", "peak_rss_gib") if k in res}}


# ---- 4. memory of one training step --------------------------------------------------------------


def child_memory(a: dict, pol_dir: str, ref_dir: str, vocab: int, recompute_head: bool) -> dict:
    """Peak memory of one forward + backward of prefsel's DPO objective on `memory_pairs` pairs
    (prompt `memory_prompt`, two responses of `memory_response` tokens each), on the device."""
    import resource

    a = _ns(a)
    _quiet(a.threads)
    from prefsel.logprobs import batch_logprobs
    from prefsel.models import load_causal_lm
    from prefsel.packing import Layout, layout_for
    from prefsel.train.objectives import dpo_objective

    cuda = _cuda(a)
    dt = "bf16" if cuda else "fp32"
    policy = load_causal_lm(pol_dir, dtype=dt, device=a.device)
    policy.requires_grad_(True).train()
    ref = load_causal_lm(ref_dir, dtype=dt, device=a.device)
    rng = random.Random(a.seed)
    bos, eos, lo = 1, 2, len(SPECIALS)

    def ids(n: int) -> list[int]:
        return [rng.randrange(lo, vocab) for _ in range(n)]

    rows = [{"row_id": i, "prompt_ids": [bos, *ids(a.memory_prompt - 1)],
             "response_ids": [[*ids(a.memory_response - 1), eos] for _ in range(2)]} for i in range(a.memory_pairs)]
    n_targets = sum(len(r) for row in rows for r in row["response_ids"])
    layout = layout_for([policy], Layout())
    fn = lambda b: batch_logprobs(policy, b, recompute_head=recompute_head)  # noqa: E731

    def step():
        loss, _ = dpo_objective(rows, fn, ref, 0, beta=a.beta, loss_type="sigmoid", label_smoothing=0.0,
                                layout=layout, device=a.device)
        loss.backward()

    if cuda:
        step()  # warm-up: kernels, workspaces
        policy.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30
        kind = "torch.cuda.max_memory_allocated"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        kind = "peak RSS (ru_maxrss) of a child process"
    logits = n_targets * vocab * 4 / 2**30
    step_gib = peak - base
    return {"recompute_head": recompute_head, "response_tokens": n_targets, "pairs": a.memory_pairs,
            "prompt_tokens": a.memory_prompt, "response_len": a.memory_response, "dtype": dt, "measure": kind,
            "base_gib": base, "peak_gib": peak, "step_gib": step_gib, "logits_fp32_gib": logits,
            "logits_share_of_step": logits / step_gib if step_gib > 0 else None,
            "logits_share_of_peak": logits / peak if peak > 0 else None, "step_s": seconds,
            "device_name": _device_name(a)}


# ---- the run -------------------------------------------------------------------------------------


def summarize(m: dict, step_tokens: list[int]) -> dict:
    """tokens/s and steps/s over steps 2..N (steady) and over all steps, from per-step seconds."""
    st = m.get("step_s") or []
    n = len(st)
    toks = step_tokens[:n]
    steady = slice(1, None) if n > 1 else slice(None)
    m.update(tokens=sum(toks), loop_s=sum(st),
             tokens_per_s=sum(toks[steady]) / max(sum(st[steady]), 1e-12) if n else None,
             steps_per_s=len(st[steady]) / max(sum(st[steady]), 1e-12) if n else None,
             tokens_per_s_all=sum(toks) / max(sum(st), 1e-12) if n else None,
             first_step_s=st[0] if n else None)
    return m


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "deepspeed", "ray", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny shape, fp32, 32 pairs, batch 8, micro 2")
    ap.add_argument("--pairs", type=int, default=None, help="training pairs, one epoch (default 256; --tiny 32)")
    ap.add_argument("--batch", type=int, default=None, help="pairs per optimizer step (default 32; --tiny 8)")
    ap.add_argument("--micro-batch", type=int, default=None, help="pairs per forward (default 4; --tiny 2)")
    ap.add_argument("--lr", type=float, default=None, help="constant learning rate (default 1e-5; --tiny 1e-4)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per process (and Ray CPUs of the worker)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for both trainers (default off for both)")
    ap.add_argument("--trl-weights", nargs="+", choices=["fp32", "bf16"], default=None,
                    help="TRL runs: fp32 weights + bf16 autocast, and/or bf16 weights (default both on CUDA; "
                         "the first is the baseline of the ratio column)")
    ap.add_argument("--check-dtypes", nargs="+", choices=["fp32", "bf16"], default=None,
                    help="same-batch check dtypes (default: fp32 bf16 on CUDA, bf16 for 8b, fp32 on the CPU)")
    ap.add_argument("--check-pairs", type=int, default=None, help="pairs of the same-batch check (default: micro batch)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size of the models (default: the shape's; "
                    "e.g. --tiny --vocab 128256: a small backbone under Llama-3's head, where the logits dominate)")
    ap.add_argument("--memory-pairs", type=int, default=4)
    ap.add_argument("--memory-prompt", type=int, default=256, help="prompt tokens per pair of the memory row")
    ap.add_argument("--memory-response", type=int, default=512, help="tokens per response of the memory row")
    ap.add_argument("--skip", nargs="+", choices=STAGES, default=[], help="stages to leave out")
    ap.add_argument("--work-dir", help="models, data and outputs (default: a temp folder, removed at the end)")
    ap.add_argument("--json", metavar="OUT", help="write every number here (rewritten after each stage); "
                    "the run's log goes beside it (prefsel.log)")
    ap.add_argument("--verbose", "-v", action="store_true", help="print Ray's and the libraries' output as they print it")
    a = ap.parse_args(argv)
    a.shape = "tiny" if a.tiny else a.shape
    a.device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    cuda = a.device == "cuda"
    a.pairs = a.pairs or (32 if a.tiny else 256)
    a.batch = a.batch or (8 if a.tiny else 32)
    a.micro_batch = a.micro_batch or (2 if a.tiny else 4)
    a.lr = a.lr or (1e-4 if a.tiny else 1e-5)
    a.check_pairs = a.check_pairs or a.micro_batch
    a.trl_weights = a.trl_weights or (["fp32", "bf16"] if cuda else ["fp32"])
    if not a.check_dtypes:
        a.check_dtypes = (["bf16"] if a.shape == "8b" else ["fp32", "bf16"]) if cuda else ["fp32"]
    a.logging_steps = 1  # one logged loss and time per step, in both trainers
    if a.batch % a.micro_batch or a.pairs % a.batch:
        ap.error("--pairs must be a multiple of --batch, and --batch of --micro-batch")
    if not cuda and "bf16" in a.trl_weights:
        ap.error("--trl-weights bf16 needs CUDA")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    import signal

    # a time limit's SIGTERM becomes SystemExit: the JSON is saved, the running child and Ray are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not a.verbose:  # Ray Data's bars, in this process and (read when Ray starts) in the Train worker
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(a.threads)
    skip = set(a.skip)
    if a.shape == "8b" and not {"trl", "prefsel"} <= skip:
        print("8b: full fine-tuning holds about 16 bytes per parameter (bf16 weights and gradients, fp32 master "
              "weights and Adam moments): about 128 GB, more than one GPU; the training rows are left out "
              "(check and memory rows only)")
        skip |= {"trl", "prefsel"}
    vocab = a.vocab or SHAPES[a.shape][-1]
    words = word_count(vocab)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        params = sum(p.numel() for p in LlamaForCausalLM(shape_config(a.shape, vocab_size=vocab)).parameters())
    work = a.work_dir or tempfile.mkdtemp(prefix="prefsel-train-gpu-")
    os.makedirs(work, exist_ok=True)
    report: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "device": a.device, "device_name": None, "versions": versions(),
                    "config": {k: v for k, v in vars(a).items()} | {"params": params, "vocab": vocab,
                                                                    "shape_dims": SHAPES[a.shape]},
                    "check": None, "results": {}, "memory": [], "errors": {}}

    def save() -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1, default=str)

    from prefsel import console

    # prefsel's console for its long commands: Ray's INFO lines, the Ray worker's output and the
    # libraries' progress bars go to the log (beside --json, else the work folder); warnings and
    # errors still reach the console. --verbose prints everything.
    log_dir = os.path.dirname(os.path.abspath(a.json)) if a.json else a.work_dir
    if a.json:
        os.makedirs(log_dir, exist_ok=True)
    t_start = time.perf_counter()
    try:
        with console.session("train", log_dir, verbose=a.verbose):
            return _run(a, work, words, vocab, params, skip, report, save)
    finally:
        report["total_s"] = time.perf_counter() - t_start
        save()
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        if a.json:
            print(f"wrote {a.json}")


def _run(a, work, words, vocab, params, skip, report, save) -> int:
    cuda = _cuda(a)
    t0 = time.perf_counter()
    pol_dir, ref_dir = save_shape_pair(a.shape, os.path.join(work, "models"), dtype=torch.bfloat16 if cuda else torch.float32,
                                       device=a.device, words=words, vocab_size=vocab)
    _free(a)
    text = shape_rows(a.pairs, shape=a.shape, words=words, seed=a.seed)
    data_path = os.path.join(work, "pairs.jsonl")
    with open(data_path, "w") as f:
        for r in text:
            f.write(json.dumps(r) + "\n")
    from prefsel.train.data import epoch_order

    rows = tc.prefsel_rows(pol_dir, data_path)
    if [r["row_id"] for r in rows] != list(range(len(text))):
        raise RuntimeError(f"prefsel kept {len(rows)} of {len(text)} rows, or numbered them otherwise")
    # prefsel's batch plan (prefsel.train.data): epoch 0's permutation, global batches in order, each
    # cut into micro-batches in order. TRL gets the pairs in this order with a sequential sampler.
    order = [int(i) for i in epoch_order(len(rows), a.seed, 0)]
    text_o, rows_o = [text[i] for i in order], [rows[i] for i in order]
    pair_tokens = [2 * len(r["prompt_ids"]) + sum(len(x) for x in r["response_ids"]) for r in rows_o]
    step_tokens = [sum(pair_tokens[k : k + a.batch]) for k in range(0, len(pair_tokens), a.batch)]
    max_length = max(2048, max(len(r["prompt_ids"]) + max(len(x) for x in r["response_ids"]) for r in rows))
    print(f"models and data: {time.perf_counter() - t0:.1f}s; shape {a.shape} {SHAPES[a.shape]}, {params / 1e9:.3f}B "
          f"params, {a.pairs} pairs, {sum(pair_tokens)} tokens (prompt twice per pair), {len(step_tokens)} steps, "
          f"device {a.device}", flush=True)
    a_dict = vars(a)

    # a stage that fails is recorded (report["errors"]) and the others still run
    def stage(name: str, fn, *args):
        t = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001
            report["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"{name}: FAILED after {time.perf_counter() - t:.0f}s: {report['errors'][name]}", flush=True)
            traceback.print_exc()
            save()
            return None
        print(f"{name}: {time.perf_counter() - t:.0f}s", flush=True)
        return out

    # 1. same batch: different token ids or a float32 disagreement stop the run; a bf16 miss is
    # recorded and the timings go on (bf16 rounding differs between two correct trainers; the
    # float32 check is the exactness test); a check that could not run (an error) does not stop
    # it either, and loss 1 of the table (the same batch in every row) is then the check
    if "check" not in skip:
        chk = stage("same-batch check", in_child, child_check, a_dict, pol_dir, ref_dir, data_path, text_o, rows_o, work)
        if chk is None:
            print("same-batch check did not run: the timings go on; compare loss 1 of the rows (the same batch)")
        else:
            report["check"], report["device_name"] = chk, chk["device_name"]
            save()
            print(f"token ids: {len(rows_o) - chk['token_mismatches']}/{len(rows_o)} pairs identical in prefsel's "
                  f"and TRL's tokenization")
            for c in chk["checks"]:
                print(f"same-batch check ({c['pairs']} pairs, first micro-batch, {c['dtype']} on {a.device}): "
                      f"prefsel loss {c['prefsel']:.7f}, TRL loss {c['trl']:.7f}, |diff| {c['abs_diff']:.1e} "
                      f"(tolerance {c['tol']:.0e}) {'ok' if c['ok'] else 'FAILED'}", flush=True)
            if chk["token_mismatches"] or not all(c["ok"] for c in chk["checks"] if c["dtype"] != "bf16"):
                print("the two trainers do not compute the same loss on the same batch: timings not comparable, "
                      "stopping")
                return 1
            if not all(c["ok"] for c in chk["checks"]):
                print("the bf16 check is outside its tolerance (recorded in the JSON); the timings go on", flush=True)

    # 2-4. timings and memory
    def trl_row(weights: str) -> None:
        name = f"TRL DPOTrainer ({'fp32 weights, bf16 autocast' if weights == 'fp32' and cuda else weights + ' weights'})"
        m = stage(name, in_child, child_trl, a_dict, weights, pol_dir, ref_dir, text_o, os.path.join(work, f"trl-{weights}"))
        if m:
            report["device_name"] = report["device_name"] or m["device_name"]
            report["results"][name] = summarize(m, step_tokens) | {"kind": "trl", "weights": weights}
        save()

    trl_runs = [] if "trl" in skip else list(a.trl_weights)
    if trl_runs:  # the baseline first; other variants after prefsel and memory (a run cut short keeps the main rows)
        trl_row(trl_runs.pop(0))
    if "prefsel" not in skip:
        out_dir = os.path.join(work, "prefsel")
        name = "prefsel, Ray Train worker, ZeRO-2, packed"
        m = stage(name, run_prefsel_worker, a, pol_dir, ref_dir, data_path, out_dir, max_length)
        if m:
            report["results"][name] = summarize(m, step_tokens) | {"kind": "prefsel"}
        shutil.rmtree(out_dir, ignore_errors=True)  # its final/ (1b: about 2.5 GB in bf16)
        save()
    if "memory" not in skip:
        for mode in (False, True):  # the head's logits kept for backward, or recomputed (training's default)
            m = stage(f"memory row (recompute_head={mode})", in_child, child_memory, a_dict, pol_dir, ref_dir, vocab, mode)
            if m:
                report["memory"].append(m)
                report["device_name"] = report["device_name"] or m["device_name"]
            save()
    for weights in trl_runs:
        trl_row(weights)
    print_tables(a, report, params)
    return 0 if not report["errors"] else 2


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def print_tables(a, report: dict, params: int) -> None:
    cuda = _cuda(a)
    v = report["versions"]
    print()
    print(f"DPO training, shape {a.shape} ({params / 1e9:.2f}B params, vocabulary {report['config']['vocab']}), "
          f"{a.pairs} pairs, 1 epoch, batch {a.batch} (micro {a.micro_batch} x {a.batch // a.micro_batch}), "
          f"lr {a.lr:g}, beta {a.beta}, {'bf16' if cuda else 'fp32'}, gradient checkpointing "
          f"{'on' if a.gradient_checkpointing else 'off'}; {report['device_name']}; "
          f"torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, deepspeed {v['deepspeed']}, "
          f"ray {v['ray']}; {report['date']}")
    res = report["results"]
    if res:
        base = next((m for m in res.values() if m["kind"] == "trl"), None)
        mem = "peak GiB (GPU)" if cuda else "peak RSS GiB"
        print()
        print(f"| method | steps | tokens/s | steps/s | vs first TRL row | step 1 s | {mem} | loss 1 | loss 2 | loss 3 | loss 4 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, m in res.items():
            ratio = m["tokens_per_s"] / base["tokens_per_s"] if base and m["tokens_per_s"] and base["tokens_per_s"] else None
            peak = m.get("peak_gpu_gib") if cuda else m.get("peak_rss_gib")
            losses = (list(m["losses"][:4]) + [None] * 4)[:4]
            print(f"| {name} | {m['steps']} | {_f(m['tokens_per_s'], '.0f')} | {_f(m['steps_per_s'], '.3f')} | "
                  f"{_f(ratio, '.2f')}x | {_f(m['first_step_s'], '.2f')} | {_f(peak, '.2f')} | "
                  + " | ".join(_f(x, ".4f") for x in losses) + " |")
        print(f"tokens/s and steps/s: steps 2..N (step 1, with its warm-up, apart); tokens: prompt+chosen and "
              f"prompt+rejected of the trained pairs, the same count for every row. Peak: "
              f"{'torch.cuda.max_memory_allocated' if cuda else 'max RSS'} of the training process (prefsel: the Ray "
              f"worker). Both trainers take the same pairs in the same order, so loss k is the same batch in each row.")
    if report["memory"]:
        print()
        print(f"one training step (forward + backward, no optimizer) of prefsel's DPO objective, "
              f"{'bf16' if cuda else 'fp32'}, {report['memory'][0]['measure']}:")
        print("| recompute_head | response tokens | peak GiB | resident before GiB | step GiB | fp32 logits GiB "
              "(tokens x vocab x 4) | logits / step | logits / peak | step s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for m in report["memory"]:
            print(f"| {m['recompute_head']} | {m['response_tokens']} | {m['peak_gib']:.2f} | {m['base_gib']:.2f} | "
                  f"{m['step_gib']:.2f} | {m['logits_fp32_gib']:.2f} | {_f(m['logits_share_of_step'], '.0%')} | "
                  f"{_f(m['logits_share_of_peak'], '.0%')} | {m['step_s']:.2f} |")
        if not cuda:
            print("CPU: peak RSS of a child process (Python, torch and both models included), not GPU memory.")
    if report["errors"]:
        print()
        for name, err in report["errors"].items():
            print(f"FAILED {name}: {err}")


if __name__ == "__main__":
    sys.exit(main())
