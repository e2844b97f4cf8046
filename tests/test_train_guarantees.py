"""What a training run guarantees beyond its loss curve: a used storage folder is never resumed
by a new run, ZeRO-3 works with an online reference, the SFT loss is a token-weighted mean over
the global batch, the logged learning rate is the step's, the RNG state travels in checkpoints,
and an s3:// OUTPUT gets its files (CPU, tiny models)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from test_object_storage import BUCKET, _get, _keys, _put, s3  # noqa: F401  (s3: the moto fixture)
from test_train import _args, _curve, _run, _write, toy, toy_multi, toy_pairs  # noqa: F401  (toy: a fixture)

FAST = ("--strategy", "ddp", "--num-workers", "1", "--train-batch-size", "8", "--micro-train-batch-size", "4",
        "--learning-rate", "3e-3", "--lr-warmup-ratio", "0", "--no-tensorboard")


# ---- the worker's step, without Ray ----------------------------------------------------------------


def _sft_rows() -> list[dict]:
    """Four rows whose chosen responses are 2, 3, 21 and 41 tokens long."""
    return [{"row_id": i, "prompt_ids": [1, 5, 6], "response_ids": [list(range(10, 10 + n)) + [2], [7, 2]],
             "rewards": [], "margin": 0.0} for i, n in enumerate([1, 2, 20, 40])]


def _tiny_lm():
    from prefsel.tiny import build_tiny_llama

    return build_tiny_llama(64, hidden_size=16, intermediate_size=32, seed=0, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)


def _worker(rows: list[dict], micro: int, world: int, rank: int, total: int = 1, **kw):
    """Rank `rank` of `world` with a real DDPEngine on an SFT run (no process group: the mean
    over ranks is left to the caller); the optimizer's update is replaced by recording the
    gradients it is handed. Returns (worker, engine, objective, recorded gradients)."""
    from prefsel.train.config import TrainConfig
    from prefsel.train.loop import Objective, Worker
    from prefsel.train.objectives import LogpModule
    from prefsel.train.strategy import DDPEngine

    cfg = TrainConfig("sft", "m", "d", "/tmp/unused", strategy="ddp", train_batch_size=len(rows),
                      micro_train_batch_size=micro, num_workers=world, max_norm=0.0, **kw)
    torch.manual_seed(0)
    module = LogpModule(_tiny_lm())
    engine = DDPEngine(cfg, module, total, torch.device("cpu"))
    seen: list[torch.Tensor] = []
    engine.optimizer.step = lambda: seen.append(
        torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).clone())
    w = Worker(cfg=cfg, rank=rank, world=world, device=torch.device("cpu"), pad_id=0, steps_per_epoch=1,
               total_steps=total, last_step=total, has_eval=False)
    return w, engine, Objective(cfg, None, 0, torch.device("cpu"), total, model=module.model), seen


def test_sft_step_is_the_token_weighted_mean_over_the_global_batch_whatever_micro_and_workers():
    """README: the SFT loss is -(sum of response log-probs) / (response tokens) over the batch.
    The step's gradient and its logged loss are that over the whole global batch for micro 1, 2, 4
    and 1 or 2 workers (DDP's mean over ranks taken here), not a mean of per-micro-batch means."""
    from prefsel.packing import Layout, one_batch
    from prefsel.train.loop import _zero_stats, train_one_step
    from prefsel.train.objectives import LogpModule, finish_stats

    rows = _sft_rows()
    torch.manual_seed(0)
    module = LogpModule(_tiny_lm())
    batch = one_batch([(r["prompt_ids"], [r["response_ids"][0]]) for r in rows], 0, Layout(), None)
    want_loss = -module(batch).sum() / sum(len(r["response_ids"][0]) for r in rows)  # one forward, 65 tokens
    want_loss.backward()
    want = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    for micro, world in ((4, 1), (1, 1), (2, 1), (2, 2), (1, 2)):
        grads, window = [], _zero_stats()
        for rank in range(world):
            w, engine, objective, seen = _worker(rows, micro, world, rank)
            train_one_step(w, engine, objective, rows, np.arange(len(rows)), 0, window)
            grads += seen
        grad = sum(grads) / world
        rel = ((grad - want).norm() / want.norm()).item()
        print(f"micro {micro} x {world} workers: relative gradient error {rel:.2e}")
        assert rel < 1e-5, (micro, world, rel)
        assert finish_stats(window)["loss"] == pytest.approx(want_loss.item(), rel=1e-6)


def test_logged_lr_is_the_rate_the_step_used():
    """Step s (from 0) is taken at lr x lr_lambda(s); the scheduler moves on after the update,
    so the rate read after it is step s+1's."""
    from prefsel.train.loop import _zero_stats, train_one_step
    from prefsel.train.strategy import lr_lambda

    rows = _sft_rows()
    w, engine, objective, _ = _worker(rows, 4, 1, 0, total=8, lr_warmup_ratio=0.25, learning_rate=1e-3)
    f = lr_lambda(w.cfg, 8)
    got = [train_one_step(w, engine, objective, rows, np.arange(len(rows)), s, _zero_stats())[1] for s in range(8)]
    assert got == pytest.approx([1e-3 * f(s) for s in range(8)], rel=1e-12)
    assert got[0] < got[1] < got[2] > got[7]  # warmup, then decay: the schedule is really moving


def test_weight_decay_shrinks_matrices_never_norms_or_biases():
    """AdamW at a zero gradient moves a parameter by weight decay alone: p <- p (1 - lr wd). The
    matrices (embeddings, projections) shrink by that; norm scales and biases stay as they were."""
    from prefsel.train.config import TrainConfig
    from prefsel.train.strategy import make_optimizer

    torch.manual_seed(0)
    model = _tiny_lm()
    model.model.layers[0].mlp.down_proj.bias = torch.nn.Parameter(torch.randn(16))  # a bias to keep
    params = list(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params}
    lr, wd = 1e-2, 0.5
    cfg = TrainConfig("sft", "m", "d", "/tmp/unused", strategy="ddp", learning_rate=lr, weight_decay=wd)
    opt = make_optimizer(cfg, [p for _, p in params], torch.device("cpu"))
    for _, p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    vectors = {n for n, p in params if p.ndim == 1}
    assert any("norm" in n for n in vectors) and any(n.endswith("bias") for n in vectors), vectors
    for n, p in params:
        want = before[n] if n in vectors else before[n] * (1 - lr * wd)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7, msg=n)
    assert sum(p.ndim >= 2 for _, p in params) >= 5  # embeddings, attention and MLP matrices shrank


def test_sft_refuses_multi_response_data(toy, tmp_path):
    """Auto-detected multi-response data is refused (as by dpo and rm), not trained on responses[0]."""
    from prefsel.models import load_tokenizer
    from prefsel.tokenization import PairTokenizer
    from prefsel.train.data import load_rows

    data = _write(tmp_path / "multi.jsonl", toy_multi(8, 1))
    with pytest.raises(ValueError, match="prefsel train sft needs pairs; the data holds many responses"):
        load_rows(data, "sft", PairTokenizer(load_tokenizer(toy["model"]), "none"))


# ---- Ray Train runs (DDP or ZeRO-3, one worker, a few steps) -------------------------------------------


def _metrics(out) -> dict:
    """step -> that step's training record in OUTPUT/metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_a_new_run_refuses_a_used_storage_folder_and_overwrite_starts_afresh(ray_local, toy, tmp_path):
    """Ray Train V2 restores any checkpoint under STORAGE/RUN_NAME by itself: a second run with
    another OUTPUT, data and seed at the same --storage-path used to continue the first one's
    checkpoint and export its weights as its own final/."""
    store = tmp_path / "store"
    data_a = _write(tmp_path / "a.jsonl", toy_pairs(30, 10))
    data_b = _write(tmp_path / "b.jsonl", toy_pairs(30, 20))
    a = _run([*_args("dpo", toy, tmp_path / "a", "--data", data_a), *FAST, "--storage-path", str(store),
              "--max-steps", "2"])
    assert a["resumed_from_step"] == 0 and (store / "train" / "checkpoint_00000002").is_dir()
    assert a["max_length"] == 1024  # unset: the toy model's positions, as prefsel score takes them
    # the summary counts what was trained: 3 full batches of 8 per epoch, 6 of the 30 rows left out
    assert (a["rows_used"], a["rows_trained_per_epoch"], a["rows_dropped_per_epoch"]) == (30, 24, 6)
    assert _metrics(tmp_path / "a")[1]["lr"] == 3e-3  # step 1's rate (warmup 0: the peak), not step 2's
    b = [*_args("dpo", toy, tmp_path / "b", "--data", data_b), *FAST, "--storage-path", str(store),
         "--max-steps", "2", "--seed", "7"]
    with pytest.raises(FileExistsError, match=f"run folder {store}/train .*--resume.*--overwrite"):
        _run(b)
    assert (store / "train" / "checkpoint_00000002").is_dir() and not (tmp_path / "b").exists()  # nothing touched
    # --resume would continue A's checkpoint on B's rows, seed and rate: refused, every difference named
    with pytest.raises(ValueError, match=rf"--resume: the run in {store}/train was started with other settings "
                       rf"\(input files differ: .*b\.jsonl.*; also differs in: learning_rate \(0\.003 -> 0\.001\), "
                       rf"seed \(3 -> 7\)\)"):
        _run([*b, "--learning-rate", "1e-3", "--resume"])
    assert not (tmp_path / "b").exists()
    s = _run([*b, "--overwrite"])
    assert s["resumed_from_step"] == 0 and s["steps"] == 2
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / x / "final" / "model.safetensors") for x in ("a", "b"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # B's own weights, not A's


def test_a_run_that_failed_before_any_checkpoint_resumes_with_other_settings(ray_local, toy, tmp_path, monkeypatch):
    """A run that dies before its first checkpoint has nothing to resume: its fingerprint is
    dropped, so the corrected command's --resume is not refused for the settings it changed."""
    from prefsel.train.job import FINGERPRINT
    from test_train import _fail_once_after_step

    data = _write(tmp_path / "d.jsonl", toy_pairs(16, 10))
    argv = [*_args("dpo", toy, tmp_path / "out", "--data", data), *FAST, "--max-steps", "2"]
    with monkeypatch.context() as m:
        _fail_once_after_step(m, 1, str(tmp_path / "_failed"))  # no --save-steps: no checkpoint at step 1
        with pytest.raises(Exception, match="injected failure after step 1"):
            _run(argv)
    assert not (tmp_path / "out" / "train" / FINGERPRINT).exists()
    s = _run([*argv, "--learning-rate", "1e-3", "--resume"])
    assert s["resumed_from_step"] == 0 and s["steps"] == 2
    assert (tmp_path / "out" / "train" / FINGERPRINT).exists()
    # a resume over a fingerprint checks it and writes it back from one listing and stamping
    import prefsel.train.job as job

    made = []
    monkeypatch.setattr(job, "train_fingerprint", lambda cfg, f=job.train_fingerprint: made.append(1) or f(cfg))
    s = _run([*argv, "--learning-rate", "1e-3", "--resume"])
    assert s["steps"] == 2 and len(made) == 1


def test_a_max_length_over_the_models_positions_is_refused_before_anything(toy, tmp_path):
    """--max-length 2048 on a model of 1024 positions: refused before the output is touched (a
    longer row would crash a learned-position model's forward, or train a rotary one past its
    range), even with --overwrite, which would delete the old output first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old run")
    with pytest.raises(ValueError, match=r"max_length: 2048 exceeds the models' 1024 positions "
                                         r"\(max_position_embeddings of .*'s config\); give at most 1024"):
        _run([*_args("dpo", toy, out, "--data", toy["pairs"]), *FAST, "--max-length", "2048", "--overwrite"])
    assert (out / "keep.txt").read_text() == "old run"


def test_zero3_with_an_online_reference_trains(ray_local, toy, tmp_path):
    """ZeRO-3 loads the policy into shards (HfDeepSpeedConfig); the frozen online reference must
    not be partitioned with it. At step 1 the policy is the reference: every margin is 0."""
    out = tmp_path / "z3"
    _run([*_args("dpo", toy, out, "--data", _write(tmp_path / "p.jsonl", toy_pairs(16, 10))),
          "--num-workers", "1", "--zero-stage", "3", "--ref-mode", "online", "--train-batch-size", "8",
          "--micro-train-batch-size", "4", "--learning-rate", "3e-3", "--lr-warmup-ratio", "0",
          "--max-steps", "2", "--no-tensorboard", "--no-final-checkpoint"])
    m = _metrics(out)
    print("ZeRO-3 online:", {s: (r["loss"], r["margin"]) for s, r in m.items()})
    assert m[1]["loss"] == pytest.approx(math.log(2), abs=1e-6) and m[1]["margin"] == pytest.approx(0, abs=1e-6)
    assert m[2]["loss"] < math.log(2) and m[2]["margin"] > 0  # it learns against the fixed reference


@pytest.fixture(scope="module")
def dropout_model(toy, tmp_path_factory):
    """The toy policy with attention dropout 0.3 (so a training forward draws from torch's RNG)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("dropout") / "sft"
    model = AutoModelForCausalLM.from_pretrained(toy["model"], attention_dropout=0.3)
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(toy["model"]).save_pretrained(d)
    return str(d)


def test_resume_restores_the_rng_so_dropout_continues_as_uninterrupted(ray_local, toy, dropout_model, tmp_path):
    data = _write(tmp_path / "p.jsonl", toy_pairs(32, 10))

    def argv(out, steps):
        return [*_args("dpo", {**toy, "model": dropout_model}, tmp_path / out, "--data", data), *FAST,
                "--max-steps", str(steps)]

    _run(argv("straight", 3))
    _run(argv("resumed", 2))
    s = _run([*argv("resumed", 3), "--resume"])
    assert s["resumed_from_step"] == 2
    a, b = _curve(tmp_path / "straight"), _curve(tmp_path / "resumed")
    print("dropout, uninterrupted vs resumed at 2:", [(k, a[k], b[k]) for k in sorted(a)])
    assert a[1] == b[1] and a[2] == b[2]
    assert b[3] == pytest.approx(a[3], rel=1e-6)  # step 3's dropout masks are the uninterrupted run's


# ---- object storage (the moto server of tests/test_object_storage.py) ---------------------------------


def test_used_s3_output_or_storage_is_refused_or_replaced(s3, tmp_path):
    from prefsel.train.config import TrainConfig
    from prefsel.train.job import _prepare_output

    client, _ = s3
    out = f"s3://{BUCKET}/used/out"
    _put(client, "used/out/final/config.json", "{}")
    with pytest.raises(FileExistsError, match=f"--output {out} is not empty: pass --resume .* or --overwrite"):
        _prepare_output(TrainConfig("dpo", "m", "d", out))
    _prepare_output(TrainConfig("dpo", "m", "d", out, resume=True))
    assert _keys(client, "used/out/") == ["used/out/final/config.json"]
    _prepare_output(TrainConfig("dpo", "m", "d", out, overwrite=True))
    assert _keys(client, "used/out/") == []  # (pyarrow leaves a marker for the parent, used/)

    store = f"s3://{BUCKET}/used/store"
    _put(client, "used/store/run1/checkpoint_00000002/train_state.json", "{}")
    local = str(tmp_path / "out")
    with pytest.raises(FileExistsError, match=f"run folder {store}/run1 .*--resume .*--overwrite"):
        _prepare_output(TrainConfig("dpo", "m", "d", local, storage_path=store, run_name="run1"))
    _prepare_output(TrainConfig("dpo", "m", "d", local, storage_path=store, run_name="run2"))  # another run name
    _prepare_output(TrainConfig("dpo", "m", "d", local, storage_path=store, run_name="run1", resume=True))
    assert _keys(client, "used/store/") == ["used/store/run1/checkpoint_00000002/train_state.json"]
    _prepare_output(TrainConfig("dpo", "m", "d", local, storage_path=store, run_name="run1", overwrite=True))
    assert _keys(client, "used/store/run1/") == []  # (pyarrow leaves a marker for the parent, used/store/)


@pytest.mark.parametrize("kw, message", [
    ({"train_batch_size": 0}, "--train-batch-size must be >= 1"),
    ({"adam_betas": (0.9, 1.0)}, r"--adam-betas must be two numbers in \[0, 1\)"),
    ({"weight_decay": -0.1}, "--weight-decay must be >= 0"),
    ({"min_lr_ratio": -1.0}, r"--min-lr-ratio must be in \[0, 1\]"),
    ({"min_lr_ratio": 1.5}, r"--min-lr-ratio must be in \[0, 1\]"),
    ({"learning_rate": float("nan")}, "--learning-rate must be > 0"),
    ({"ref_actors": 0}, "--ref-actors must be >= 1"),
    ({"ref_batch_tokens": 0}, "--ref-batch-tokens must be >= 1"),
    ({"cpus_per_worker": 0}, "--cpus-per-worker must be > 0"),
    ({"zero_stage": 0, "offload_optimizer": True}, "--offload-optimizer needs --zero-stage 1, 2 or 3"),
    ({"strategy": "ddp", "offload_optimizer": True}, "need --strategy deepspeed"),
    ({"strategy": "ddp", "zero_stage": 3, "offload_param": True}, "need --strategy deepspeed"),
])
def test_settings_the_workers_would_fail_on_are_refused_in_the_driver(kw, message):
    """Each of these failed only inside the Ray Train workers (torch's AdamW, DeepSpeed's CPU Adam
    with the parameters on the GPU, a Ray resource request), after the data was tokenized and the
    reference precomputed, or trained on silently (a negative or rising LR floor, offload flags
    DDP ignores)."""
    from prefsel.train.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig("dpo", "m", "d", "/o", **{"train_batch_size": 8, **kw})


def test_hps_negatives_is_refused_in_sample_mode():
    from prefsel.train.config import TrainConfig

    with pytest.raises(ValueError, match="--hps-negatives applies to --hps-mode loss"):
        TrainConfig("hps", "m", "d", "/o", hps_negatives=2, train_batch_size=8)
    TrainConfig("hps", "m", "d", "/o", hps_negatives=2, hps_mode="loss", train_batch_size=8)


def test_every_train_setting_is_either_fingerprinted_or_free_on_resume():
    from dataclasses import fields

    from prefsel.train.config import TrainConfig
    from prefsel.train.job import RESUMABLE_SETTINGS, TRAJECTORY_SETTINGS

    assert not set(TRAJECTORY_SETTINGS) & set(RESUMABLE_SETTINGS)
    assert sorted((*TRAJECTORY_SETTINGS, *RESUMABLE_SETTINGS)) == sorted(f.name for f in fields(TrainConfig))


def test_resume_must_match_the_runs_trajectory_but_not_how_it_is_executed(s3, tmp_path):
    """The fingerprint a run leaves in its run folder (here on s3://): a --resume that changes
    what the run computes is refused, naming the change; how it runs may change. Under ZeRO the
    worker count is part of it (each rank restores its own optimizer partition), under DDP not."""
    from prefsel.train.config import TrainConfig
    from prefsel.train.job import FINGERPRINT, _prepare_output, _write_fingerprint

    client, _ = s3
    store, local = f"s3://{BUCKET}/fp/store", str(tmp_path / "out")

    def cfg(data="d", **kw):
        return TrainConfig("dpo", "m", data, local, storage_path=store, train_batch_size=8, **kw)

    _write_fingerprint(cfg(num_workers=2))
    assert f"fp/store/train/{FINGERPRINT}" in _keys(client, "fp/store/train/")
    _prepare_output(cfg(num_workers=2, micro_train_batch_size=4, packing=False, max_steps=9, save_steps=3,
                        gradient_checkpointing=True, logging_steps=5, resume=True))
    for change, said in (({"num_workers": 1}, r"num_workers \(2 -> 1\)"),
                         ({"num_workers": 2, "epochs": 2}, r"epochs \(1 -> 2\)"),
                         ({"num_workers": 2, "beta": 0.5, "loss_type": "ipo"},
                          r"beta \(0\.1 -> 0\.5\), loss_type \(\"sigmoid\" -> \"ipo\"\)")):
        with pytest.raises(ValueError, match=rf"--resume: the run in {store}/train .*differs in: {said}\)"):
            _prepare_output(cfg(**change, resume=True))
    _write_fingerprint(cfg(strategy="ddp", num_workers=2))
    _prepare_output(cfg(strategy="ddp", num_workers=1, resume=True))  # DDP: rank 0's state serves any count
    # the data is stamped file by file, a glob's files too: the one rewritten is named
    for i in (1, 2):
        _write(tmp_path / f"part{i}.jsonl", toy_pairs(4, i))
    glob = str(tmp_path / "part*.jsonl")
    _write_fingerprint(cfg(glob, strategy="ddp"))
    _prepare_output(cfg(glob, strategy="ddp", resume=True))
    _write(tmp_path / "part2.jsonl", toy_pairs(5, 2))
    with pytest.raises(ValueError, match=r"input file changed since it started: \S*/part2\.jsonl \("):
        _prepare_output(cfg(glob, strategy="ddp", resume=True))


def test_s3_output_gets_summary_metrics_and_tensorboard(s3, toy, tmp_path):
    client, _ = s3
    out = f"s3://{BUCKET}/trained/dpo"
    s = _run([*_args("dpo", toy, out, "--data", _write(tmp_path / "p.jsonl", toy_pairs(16, 10))),
              *FAST[:-1], "--max-steps", "2"])
    keys = _keys(client, "trained/dpo/")
    summary = json.loads(_get(client, "trained/dpo/summary.json"))
    assert summary["steps"] == s["steps"] == 2 and summary["samples"] == 16  # the worker's numbers, via S3
    lines = [json.loads(x) for x in _get(client, "trained/dpo/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2]
    assert any(k.startswith("trained/dpo/tensorboard/events.out.tfevents") for k in keys), keys
    assert "trained/dpo/final/config.json" in keys and "trained/dpo/train_result.json" in keys
    assert not [k for k in keys if ".tmp-" in k]


def test_online_reference_of_another_family_gets_a_layout_it_runs_exactly():
    """--ref-mode online: the reference forwards the policy's batches, so the layout is checked
    against both models, as the precompute path checks the reference's own. A Bloom reference
    (ALiBi: packed rows would be wrong) beside a Llama policy: padded rows, and the loss equals
    the DPO formula over each sequence's own float64 forward (before: a packed batch the
    reference refused mid-run)."""
    import transformers as tf

    from prefsel.train.config import TrainConfig
    from prefsel.train.loop import Objective
    from prefsel.train.objectives import LogpModule

    policy = _tiny_lm()
    torch.manual_seed(1)
    ref = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=4)).eval()
    cfg = TrainConfig("dpo", "m", "d", "/tmp/unused", strategy="ddp", train_batch_size=2, ref_mode="online")
    objective = Objective(cfg, ref, 0, torch.device("cpu"), 1, model=policy)
    assert not objective.layout.packing
    rows = [{"row_id": i, "prompt_ids": [1, 5, 6, 7][: 2 + i], "response_ids": [[10, 11, 12, 2], [13, 2]],
             "rewards": [], "margin": 0.0} for i in range(2)]

    def own_logp(model, prompt, response) -> float:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt + response])).logits.double(), -1)[0]
        return sum(lp[len(prompt) + k - 1, t].item() for k, t in enumerate(response))

    with torch.no_grad():
        loss, _ = objective(LogpModule(policy), rows, step=0, epoch=0, train=False)
    want = []
    for r in rows:
        (pc, pr), (rc, rr) = ([own_logp(m, r["prompt_ids"], resp) for resp in r["response_ids"]] for m in (policy, ref))
        want.append(-math.log(1 / (1 + math.exp(-cfg.beta * ((pc - rc) - (pr - rr))))))
    assert loss.item() == pytest.approx(sum(want) / len(want), rel=1e-5)
