"""Training on Ray Train + DeepSpeed (CPU, gloo, 2 workers, tiny models): DPO, HPS, RM.

The whole file is budgeted at a few minutes on 2 cores: runs are shared through module-scoped
fixtures (one learning run per objective; DDP / ZeRO-3 / kill-and-resume reuse the ZeRO-2 DPO
run as their uninterrupted reference).
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

GOOD = ["thank you kindly", "happy to help", "here is a clear answer", "glad you asked"]
BAD = ["go away now", "no idea whatever", "stop bothering me", "that is dumb"]
TOPICS = ["cats", "rain", "tea", "maps", "boats", "jazz", "salt", "trees", "clocks", "bread",
          "stars", "rivers", "paper", "glass", "honey", "wolves"]
QUALITY = ["awful", "poor", "okay", "good", "great"]


def _prompt(rng):
    return f"Question: tell me about {rng.choice(TOPICS)} and {rng.choice(TOPICS)}?\nAnswer:"


def toy_pairs(n, seed):
    rng = random.Random(seed)
    return [{"prompt": _prompt(rng), "chosen": " " + rng.choice(GOOD) + ".",
             "rejected": " " + rng.choice(BAD) + "."} for _ in range(n)]


def toy_multi(n, seed, k=4):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        levels = rng.sample(range(len(QUALITY)), k)
        rows.append({"prompt": _prompt(rng),
                     "responses": [f" this is {QUALITY[q]} {QUALITY[q]}." for q in levels],
                     "rewards": [float(q) + rng.uniform(-0.2, 0.2) for q in levels]})
    return rows


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny Llama (hidden 32) + BPE tokenizer saved as a causal LM, and toy train/eval files."""
    from prefsel.tiny import build_tiny_llama, build_tiny_tokenizer

    d = tmp_path_factory.mktemp("train_toy")
    texts = [p["prompt"] + p["chosen"] + p["rejected"] for p in toy_pairs(200, 1)]
    texts += [m["prompt"] + "".join(m["responses"]) for m in toy_multi(100, 2)]
    tok = build_tiny_tokenizer(texts, vocab_size=300, chat_template=False)
    model = build_tiny_llama(len(tok), hidden_size=32, intermediate_size=64, seed=0,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # a calmer init than the scorer tests' (std 0.2) so training is smooth
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    model.save_pretrained(d / "sft")
    tok.save_pretrained(d / "sft")
    return {
        "dir": d,
        "model": str(d / "sft"),
        "pairs": _write(d / "pairs.jsonl", toy_pairs(256, 10)),
        "pairs_eval": _write(d / "pairs_eval.jsonl", toy_pairs(64, 11)),
        "multi": _write(d / "multi.jsonl", toy_multi(128, 12)),
        "multi_eval": _write(d / "multi_eval.jsonl", toy_multi(48, 13)),
    }


def _args(task, toy, out, *extra):
    return [task, "--model", toy["model"], "--output", str(out), "--num-workers", "2",
            "--chat-template", "none", "--no-progress", "--seed", "3", *extra]


def _run(argv):
    from prefsel.cli import build_parser
    from prefsel.train.cli import run

    return run(build_parser().parse_args(["train", *argv]))


def _curve(out):
    """step -> loss from OUTPUT/metrics.jsonl (the last record per step wins: restarts re-log)."""
    curve = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                curve[r["step"]] = r["loss"]
    return curve


# ---- pure objective tests (no Ray) ---------------------------------------------------------------


def _rows(toy, kind="pairs", n=6):
    from prefsel.formats import to_example
    from prefsel.models import load_tokenizer
    from prefsel.tokenization import PairTokenizer

    tok = load_tokenizer(toy["model"])
    pt = PairTokenizer(tok, "none")
    src = toy_pairs(n, 5) if kind == "pairs" else toy_multi(n, 6)
    rows = []
    for i, r in enumerate(src):
        ex = to_example(r, kind)
        t = pt.encode(ex)
        rows.append({"row_id": i, "prompt_ids": t.prompt_ids, "response_ids": t.response_ids,
                     "rewards": ex.rewards or [], "margin": 0.5})
    return tok, rows


def test_dpo_objective_calls_dpo_loss_on_independent_logps(toy):
    from prefsel.logprobs import collate_sequences, response_logprobs
    from prefsel.losses import dpo_loss
    from prefsel.models import load_causal_lm
    from prefsel.train.objectives import LogpModule, dpo_objective

    tok, rows = _rows(toy)
    policy = load_causal_lm(toy["model"], dtype="fp32", device="cpu")
    ref = load_causal_lm(toy["model"], dtype="fp32", device="cpu")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))

    def lp(model, j):
        ids, attn, resp = collate_sequences([r["prompt_ids"] for r in rows],
                                            [r["response_ids"][j] for r in rows], tok.pad_token_id)
        return response_logprobs(model, ids, attn, resp).float()

    for loss_type in ("sigmoid", "ipo"):
        loss, st = dpo_objective(rows, LogpModule(policy), ref, tok.pad_token_id, beta=0.1,
                                 loss_type=loss_type, label_smoothing=0.1)
        want = dpo_loss(lp(policy, 0), lp(policy, 1), lp(ref, 0), lp(ref, 1), beta=0.1,
                        loss_type=loss_type, label_smoothing=0.1)
        assert loss.item() == pytest.approx(want.losses.mean().item(), rel=1e-5, abs=1e-6)
        assert st["acc"] / st["acc_n"] == pytest.approx(
            (want.chosen_rewards > want.rejected_rewards).float().mean().item())
    # precomputed reference column gives the same loss as the online reference
    for r, c, j in zip(rows, lp(ref, 0).tolist(), lp(ref, 1).tolist()):
        r["ref_logps"] = [c, j]
    pre, _ = dpo_objective(rows, LogpModule(policy), None, tok.pad_token_id, beta=0.1,
                           loss_type="sigmoid", label_smoothing=0.1)
    on, _ = dpo_objective(rows, LogpModule(policy), ref, tok.pad_token_id, beta=0.1,
                          loss_type="sigmoid", label_smoothing=0.1)
    assert pre.item() == pytest.approx(on.item(), rel=1e-5)


def test_hps_and_rm_objectives_call_the_core_losses(toy, tmp_path):
    from prefsel.logprobs import collate_sequences, response_logprobs
    from prefsel.losses import bt_loss, hps_multi_negative_loss, hps_select_chosen
    from prefsel.models import load_causal_lm
    from prefsel.train.objectives import LogpModule, RewardModule, hps_multi_objective, rm_objective

    tok, rows = _rows(toy, "multi")
    policy = load_causal_lm(toy["model"], dtype="fp32", device="cpu")
    ref = load_causal_lm(toy["model"], dtype="fp32", device="cpu")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, _ = hps_multi_objective(rows, LogpModule(policy), ref, tok.pad_token_id, beta=0.25, gamma=2.0,
                                  loss_type="sigmoid", label_smoothing=0.0)
    n = len(rows[0]["response_ids"])
    flat = [(r, j) for r in rows for j in range(n)]
    ids, attn, resp = collate_sequences([r["prompt_ids"] for r, _ in flat],
                                        [r["response_ids"][j] for r, j in flat], tok.pad_token_id)
    pol = response_logprobs(policy, ids, attn, resp).float().view(len(rows), n)
    rf = response_logprobs(ref, ids, attn, resp).float().view(len(rows), n)
    rm = torch.tensor([r["rewards"] for r in rows])
    chosen = torch.tensor([hps_select_chosen(r["rewards"]) for r in rows])
    want = hps_multi_negative_loss(pol, rf, rm, chosen, beta=0.25, gamma=2.0)
    assert loss.item() == pytest.approx(want.mean().item(), rel=1e-5)

    from transformers import AutoModelForSequenceClassification

    tok, prs = _rows(toy)
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(toy["model"], num_labels=1)
    clf.config.pad_token_id = tok.pad_token_id
    clf.eval()
    loss, _ = rm_objective(prs, RewardModule(clf), tok.pad_token_id, center_coef=0.01, use_margin=True)
    # transformers' own pooling (rightmost token != pad; pad != eos here) gives the same rewards
    with torch.no_grad():
        def hf(j):
            ids, attn, _ = collate_sequences([r["prompt_ids"] for r in prs],
                                             [r["response_ids"][j] for r in prs], tok.pad_token_id)
            return clf(input_ids=ids, attention_mask=attn).logits.squeeze(-1)
        want = bt_loss(hf(0), hf(1), margin=torch.full((len(prs),), 0.5), center_coef=0.01).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_reference_never_receives_gradients(toy):
    from prefsel.models import load_causal_lm
    from prefsel.train.objectives import LogpModule, dpo_objective

    tok, rows = _rows(toy)
    policy = load_causal_lm(toy["model"], dtype="fp32", device="cpu")
    policy.requires_grad_(True)
    ref = load_causal_lm(toy["model"], dtype="fp32", device="cpu")
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    loss, _ = dpo_objective(rows, LogpModule(policy), ref, tok.pad_token_id, beta=0.1,
                            loss_type="sigmoid", label_smoothing=0.0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_precompute_and_online_reference_load_and_score_alike(ray_local, toy, bf16):
    """--ref-mode precompute (Ray Data actors) and online (every worker) load the reference in
    the one cfg.reference_dtype, on every device (bf16 only with --bf16; "auto" would be bf16 on
    a GPU), and give the same reference log-probs for the same rows."""
    import numpy as np

    from prefsel.logprobs import collate_sequences, response_logprobs
    from prefsel.models import resolve_dtype
    from prefsel.train.config import TrainConfig
    from prefsel.train.data import precompute_reference, to_ray_dataset
    from prefsel.train.loop import load_reference

    tok, rows = _rows(toy, n=6)
    cfg = TrainConfig("dpo", toy["model"], "d", str(toy["dir"] / "unused"), bf16=bf16, train_batch_size=8)

    class Capture:  # stands in for the Ray Dataset: records what the actor pool is built with
        def map_batches(self, fn, **kw):
            self.kwargs = kw.get("fn_constructor_kwargs") or {}
            return self

        def materialize(self):
            return self

    asked = precompute_reference(Capture(), cfg, tok.pad_token_id).kwargs["dtype"]
    assert asked == cfg.reference_dtype
    for device in (torch.device("cpu"), torch.device("cuda")):  # resolve_dtype needs no GPU
        assert resolve_dtype(asked, device) == resolve_dtype(cfg.reference_dtype, device)
    online = load_reference(cfg, "cpu")
    assert next(online.parameters()).dtype == resolve_dtype(cfg.reference_dtype, torch.device("cpu"))

    pre = sorted(precompute_reference(to_ray_dataset(rows), cfg, tok.pad_token_id).take_all(),
                 key=lambda r: r["row_id"])
    got = np.array([list(r["ref_logps"]) for r in pre])
    with torch.no_grad():
        want = np.stack([response_logprobs(online, *collate_sequences(
            [r["prompt_ids"] for r in rows], [r["response_ids"][j] for r in rows], tok.pad_token_id)).numpy()
            for j in range(2)], axis=1)
    print(f"reference log-probs ({cfg.reference_dtype}): max |precompute - online| =", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=1e-6 if not bf16 else 2e-3, atol=1e-6)


def test_config_defaults_and_validation():
    from prefsel.train.config import TrainConfig
    from prefsel.train.strategy import deepspeed_config

    d = TrainConfig("dpo", "m", "d", "/tmp/o", train_batch_size=8, micro_train_batch_size=2, num_workers=2)
    h = TrainConfig("hps", "m", "d", "/tmp/o", train_batch_size=8)
    assert d.beta == 0.1 and h.beta == 0.25 and d.grad_accum == 2
    assert d.reference_dtype == "fp32" and TrainConfig("dpo", "m", "d", "/o", bf16=True).reference_dtype == "bf16"
    assert not {"fail_at_step", "extra"} & set(d.to_dict())  # no testing / catch-all fields
    assert h.gamma_at(0, 11) == -5.0 and h.gamma_at(10, 11) == 5.0 and h.gamma_at(5, 11) == 0.0
    assert TrainConfig("hps", "m", "d", "/o", hps_mode="loss").gamma_at(0, 10) == 5.0
    ds = deepspeed_config(TrainConfig("rm", "m", "d", "/o", zero_stage=3, offload_param=True,
                                      offload_optimizer=True, train_batch_size=8))
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig("dpo", "m", "d", "/o", train_batch_size=5, num_workers=2)
    with pytest.raises(ValueError, match="zero-stage 3"):
        TrainConfig("dpo", "m", "d", "/o", offload_param=True)
    with pytest.raises(ValueError, match="--keep-checkpoints must be >= 1"):  # Ray's CheckpointConfig refuses 0
        TrainConfig("dpo", "m", "d", "/o", keep_checkpoints=0)
    with pytest.raises(ValueError, match=r"--label-smoothing must be in \[0, 1\) for --loss exo_pair"):
        TrainConfig("dpo", "m", "d", "/o", loss_type="exo_pair", label_smoothing=1.5)
    TrainConfig("dpo", "m", "d", "/o", loss_type="exo_pair", label_smoothing=0.7)  # its epsilon, not a DPO smoothing
    with pytest.raises(ValueError, match="--bf16 with --strategy deepspeed needs --zero-stage 1, 2 or 3"):
        TrainConfig("dpo", "m", "d", "/o", bf16=True, zero_stage=0)  # DeepSpeed refuses bf16 + fp32 accumulation there
    TrainConfig("dpo", "m", "d", "/o", bf16=True, zero_stage=0, strategy="ddp")  # DDP ignores the stage
    with pytest.raises(ValueError, match="--local-mode runs without a process group"):
        TrainConfig("dpo", "m", "d", "/o", local_mode=True)  # default strategy deepspeed
    with pytest.raises(ValueError, match="--num-workers must be 1"):
        TrainConfig("dpo", "m", "d", "/o", local_mode=True, strategy="ddp", num_workers=2, train_batch_size=8)
    for bad in ({"gamma": float("nan")}, {"gamma_start": float("-inf")}, {"gamma_end": float("inf")}):
        with pytest.raises(ValueError, match="must be finite"):
            TrainConfig("hps", "m", "d", "/o", **bad)
    with pytest.raises(ValueError, match="--seed must be >= 0"):  # numpy's default_rng refuses it in the workers
        TrainConfig("dpo", "m", "d", "/o", seed=-1)


# ---- Ray Train runs ----------------------------------------------------------------------------------

DPO_FLAGS = ("--train-batch-size", "16", "--micro-train-batch-size", "4", "--learning-rate", "3e-3",
             "--lr-warmup-ratio", "0", "--epochs", "2", "--logging-steps", "1")


@pytest.fixture(scope="module")
def dpo_zero2(ray_local, toy):
    out = toy["dir"] / "dpo_z2"
    s = _run(_args("dpo", toy, out, "--data", toy["pairs"], "--eval-data", toy["pairs_eval"],
                   "--zero-stage", "2", *DPO_FLAGS))
    return out, s


def test_dpo_deepspeed_learns_and_saves_a_loadable_policy(dpo_zero2, toy):
    out, s = dpo_zero2
    fm = s["final_metrics"]
    print("DPO zero2 final", {k: fm[k] for k in ("loss", "reward_accuracy", "eval_reward_accuracy", "eval_loss")})
    assert s["steps"] == 32 and s["rows_used"] == 256
    assert fm["reward_accuracy"] >= 0.9 and fm["eval_reward_accuracy"] >= 0.9
    assert 0.1 < s["peak_rss_gib"] < 24 and "peak_gpu_gib" not in s  # rank 0's own, CPU only here
    assert os.path.isdir(out / "tensorboard") and any(os.scandir(out / "tensorboard"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    assert m.config.vocab_size > 0


def test_hps_sample_mode_learns(ray_local, toy):
    out = toy["dir"] / "hps_sample"
    s = _run(_args("hps", toy, out, "--data", toy["multi"], "--eval-data", toy["multi_eval"],
                   "--hps-mode", "sample", "--strategy", "ddp", *DPO_FLAGS[:-4], "--epochs", "2"))
    fm = s["final_metrics"]
    print("HPS sample final", {k: fm[k] for k in ("loss", "reward_accuracy", "eval_reward_accuracy", "gamma")})
    assert s["steps"] == 16 and fm["gamma"] == pytest.approx(5.0)
    assert fm["eval_reward_accuracy"] >= 0.8  # best response over each of its 3 negatives


def test_hps_loss_mode_learns_with_online_reference(ray_local, toy):
    out = toy["dir"] / "hps_loss"
    s = _run(_args("hps", toy, out, "--data", toy["multi"], "--eval-data", toy["multi_eval"],
                   "--hps-mode", "loss", "--gamma", "5", "--hps-negatives", "2", "--ref-mode", "online",
                   "--zero-stage", "2", *DPO_FLAGS[:-4], "--epochs", "2"))
    fm = s["final_metrics"]
    print("HPS loss final", {k: fm[k] for k in ("loss", "reward_accuracy", "eval_reward_accuracy", "gamma")})
    assert fm["reward_accuracy"] >= 0.8 and fm["eval_reward_accuracy"] >= 0.8
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")


def test_reward_model_ranks_held_out_pairs(ray_local, toy):
    out = toy["dir"] / "rm"
    s = _run(_args("rm", toy, out, "--data", toy["pairs"], "--eval-data", toy["pairs_eval"],
                   "--zero-stage", "3", "--train-batch-size", "16", "--micro-train-batch-size", "4",
                   "--learning-rate", "3e-3", "--lr-warmup-ratio", "0", "--center-coef", "0.01"))
    fm = s["final_metrics"]
    print("RM final", {k: fm[k] for k in ("loss", "reward_accuracy", "eval_reward_accuracy", "eval_margin")})
    assert fm["eval_reward_accuracy"] >= 0.9 and fm["eval_margin"] > 0.5
    # the saved classifier loads with transformers and ranks a held-out pair the same way
    from prefsel.logprobs import collate_sequences
    from transformers import AutoModelForSequenceClassification

    tok, rows = _rows(toy)
    clf = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert clf.config.pad_token_id == tok.pad_token_id and clf.config.num_labels == 1
    with torch.no_grad():
        def score(j):
            ids, attn, _ = collate_sequences([r["prompt_ids"] for r in rows],
                                             [r["response_ids"][j] for r in rows], tok.pad_token_id)
            return clf(input_ids=ids, attention_mask=attn).logits.squeeze(-1)
        assert (score(0) > score(1)).float().mean() >= 0.8


@pytest.mark.parametrize("task", ["dpo", "rm"])
def test_lora_trains_adapters_and_saves_a_merged_low_rank_update(ray_local, toy, task):
    """--lora-rank: only the adapters (and an RM's new score head) learn; the saved model is
    merged, so every projection it changed moved by a matrix of rank <= r, and everything else
    (embeddings, norms) is bit-identical to the base."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = toy["dir"] / f"lora_{task}"
    s = _run(_args(task, toy, out, "--data", toy["pairs"], "--eval-data", toy["pairs_eval"], "--zero-stage", "2",
                   "--lora-rank", "4", "--lora-alpha", "8", *DPO_FLAGS[:5], "1e-2", *DPO_FLAGS[6:],
                   "--no-tensorboard"))
    fm = s["final_metrics"]
    print(f"LoRA {task} final", {k: fm[k] for k in ("loss", "reward_accuracy", "eval_reward_accuracy")})
    assert fm["loss"] < 0.6 and fm["eval_reward_accuracy"] >= 0.8
    cls = AutoModelForCausalLM if task == "dpo" else AutoModelForSequenceClassification
    base = cls.from_pretrained(toy["model"], num_labels=1) if task == "rm" else cls.from_pretrained(toy["model"])
    base, final = base.state_dict(), cls.from_pretrained(out / "final").state_dict()
    assert sorted(final) == sorted(base)  # merged: plain Llama keys, no lora_A / lora_B
    changed = 0
    for name, w in base.items():
        delta = (final[name] - w).double()
        if name.endswith("proj.weight"):  # peft "all-linear": attention and MLP projections
            assert torch.linalg.matrix_rank(delta, atol=1e-6).item() <= 4, name
            changed += bool(delta.abs().max() > 0)
        elif name == "score.weight":  # the RM's new head: initialised from --seed, trained in full
            continue
        else:
            assert torch.equal(final[name], w), name
    assert changed == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.mark.parametrize("strategy", [("--strategy", "ddp"), ("--zero-stage", "3"),
                                      ("--strategy", "ddp", "--local-mode", "--num-workers", "1"),
                                      ("--strategy", "ddp", "--gradient-checkpointing")],
                         ids=["ddp", "zero3", "ddp-local", "ddp-grad-ckpt"])
def test_zero_and_ddp_give_the_same_loss_curve(dpo_zero2, toy, strategy):
    """Same loss curve from ZeRO-2 (fixture), DDP, ZeRO-3, Ray Train local mode (in-process) and
    activation checkpointing (recomputation changes memory, not the numbers)."""
    ref_out, _ = dpo_zero2
    out = toy["dir"] / f"cmp_{'_'.join(a.strip('-') for a in strategy)}"
    _run(_args("dpo", toy, out, "--data", toy["pairs"], *strategy, *DPO_FLAGS, "--max-steps", "4",
               "--no-tensorboard"))
    a, b = _curve(ref_out), _curve(out)
    print(f"loss curves zero2 vs {strategy[-1]}:", [(s, a[s], b[s]) for s in sorted(b)])
    assert sorted(b) == [1, 2, 3, 4]
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=2e-3, abs=1e-4)


def test_ddp_bf16_autocast_trains_on_the_curve(dpo_zero2, toy):
    """DDP with --bf16 runs its forward under bf16 autocast (the inputs are TokenBatches: the
    autocast device is the module's): the curve moves by bf16 rounding, no more."""
    ref_out, _ = dpo_zero2
    out = toy["dir"] / "cmp_ddp_bf16"
    _run(_args("dpo", toy, out, "--data", toy["pairs"], "--strategy", "ddp", "--local-mode", "--num-workers", "1",
               "--bf16", *DPO_FLAGS, "--max-steps", "4", "--no-tensorboard"))
    a, b = _curve(ref_out), _curve(out)
    print("loss curves zero2 fp32 vs ddp bf16:", [(s, a[s], b[s]) for s in sorted(b)])
    assert sorted(b) == [1, 2, 3, 4]
    assert any(b[s] != a[s] for s in b)  # autocast was on: bf16 matmuls round
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=3e-2, abs=1e-3)


def _fail_once_after_step(monkeypatch, at_step: int, marker: str) -> None:
    """Test hook: rank 0 raises once, after step `at_step` (and its checkpoint), leaving `marker`.

    It rides in the train_loop_config as "on_step_end", added by a wrapper around the worker
    loop; the wrapper and the hook are closures, so Ray pickles them by value to the workers."""
    from prefsel.train import loop

    def fail_once(step, rank):
        if step == at_step and rank == 0 and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(step))
            raise RuntimeError(f"injected failure after step {step}")

    def loop_with_failure(config):
        from prefsel.train import loop as worker_loop  # the worker's own, unpatched module

        worker_loop.train_loop_per_worker({**config, "on_step_end": fail_once})

    monkeypatch.setattr(loop, "train_loop_per_worker", loop_with_failure)


def test_killed_worker_restarts_from_checkpoint_then_resume(dpo_zero2, toy, monkeypatch):
    ref_out, _ = dpo_zero2
    out = toy["dir"] / "killed"
    base = _args("dpo", toy, out, "--data", toy["pairs"], *DPO_FLAGS, "--save-steps", "2", "--no-tensorboard")
    with monkeypatch.context() as m:
        _fail_once_after_step(m, 5, str(out / "_fail_injected"))
        s = _run([*base, "--max-steps", "6", "--max-failures", "1"])
    assert (out / "_fail_injected").exists()  # it did die once, after step 5
    assert s["steps"] == 6 and s["resumed_from_step"] == 4  # restarted from checkpoint 4
    a, b = _curve(ref_out), _curve(out)
    print("kill+restart vs uninterrupted:", [(k, a[k], b[k]) for k in sorted(b)])
    for k in range(1, 7):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6)
    # --resume continues the finished run from its latest checkpoint (step 6) to step 8
    s2 = _run([*base, "--max-steps", "8", "--resume"])
    assert s2["resumed_from_step"] == 6 and s2["steps"] == 8
    b = _curve(out)
    assert b[8] == pytest.approx(a[8], rel=1e-4, abs=1e-6)
    with pytest.raises(FileExistsError):
        _run(base)


def test_no_final_checkpoint_keeps_save_steps_checkpoints_and_resumes_from_them(dpo_zero2, toy):
    """--no-final-checkpoint: the last step writes final/ but no checkpoint; --save-steps ones stay,
    and --resume restarts from the latest of them, reproducing the uninterrupted curve."""
    ref_out, _ = dpo_zero2
    out = toy["dir"] / "no_final_ckpt"
    base = _args("dpo", toy, out, "--data", toy["pairs"], "--strategy", "ddp", *DPO_FLAGS, "--max-steps", "3",
                 "--save-steps", "2", "--no-final-checkpoint", "--no-tensorboard")

    def checkpoints():
        return sorted(p.name for p in (out / "train").iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))

    s = _run(base)
    assert s["steps"] == 3 and checkpoints() == ["checkpoint_00000002"]
    assert s["checkpoint"].endswith("checkpoint_00000002") and s["final_metrics"]["step"] == 3
    assert os.path.isfile(out / "final" / "config.json")
    s2 = _run([*base, "--resume"])
    assert s2["resumed_from_step"] == 2 and s2["steps"] == 3 and checkpoints() == ["checkpoint_00000002"]
    a, b = _curve(ref_out), _curve(out)
    assert b[3] == pytest.approx(a[3], rel=2e-3, abs=1e-4)  # DDP against the ZeRO-2 fixture, as above


def test_a_selection_folder_trains_on_its_selected_file(tmp_path, toy):
    from prefsel.models import load_tokenizer
    from prefsel.tokenization import PairTokenizer
    from prefsel.sources import resolve_data
    from prefsel.train.data import load_rows

    sel = tmp_path / "selected"
    sel.mkdir()
    _write(sel / "selected.jsonl", toy_pairs(5, 1))
    (sel / "manifest.json").write_text(json.dumps({"kind": "selection", "complete": True, "fingerprint": {}}))
    (sel / "summary.json").write_text(json.dumps({"rows": 5}))
    assert resolve_data(str(sel)).endswith("selected.jsonl")
    got = load_rows(str(sel), "dpo", PairTokenizer(load_tokenizer(toy["model"]), "none"))
    assert len(got.rows) == 5 and got.rows_rejected == 0 and got.fmt == "pairs"


@pytest.mark.parametrize("task", ["dpo", "hps", "rm"])
def test_packing_on_and_off_give_the_same_loss_curve(ray_local, toy, task):
    """Packed rows with shared prompts (the default) and padded rows train identically: the
    packed forward's log-probs, rewards and gradients equal the padded ones (float32)."""
    data = toy["multi"] if task == "hps" else toy["pairs"]
    curves = {}
    for name, flags in (("packed", ()), ("padded", ("--no-packing",))):
        out = toy["dir"] / f"packing_{task}_{name}"
        _run(_args(task, toy, out, "--data", data, "--strategy", "ddp", "--local-mode", "--num-workers", "1",
                   "--train-batch-size", "8", "--micro-train-batch-size", "4", "--learning-rate", "3e-3",
                   "--lr-warmup-ratio", "0", "--max-steps", "4", "--no-tensorboard", *flags))
        curves[name] = _curve(out)
    print(f"{task} loss curves packed vs padded:", [(s, curves["packed"][s], curves["padded"][s]) for s in (1, 2, 3, 4)])
    assert sorted(curves["packed"]) == [1, 2, 3, 4]
    for s in curves["packed"]:
        assert curves["packed"][s] == pytest.approx(curves["padded"][s], abs=1e-6), s


def test_rm_lora_under_zero3_bf16_trains(ray_local, toy):
    """zero.Init loads the base in bf16; peft's adapters (float32) and its copy of the new score
    head join it as bf16, else DeepSpeed's ZeRO-3 refuses the mixed dtypes at initialisation."""
    out = toy["dir"] / "rm_lora_z3_bf16"
    s = _run(_args("rm", toy, out, "--data", toy["pairs"], "--num-workers", "1", "--zero-stage", "3", "--bf16",
                   "--lora-rank", "4", "--train-batch-size", "8", "--micro-train-batch-size", "4",
                   "--max-steps", "2", "--logging-steps", "1", "--no-tensorboard"))
    assert s["final_metrics"]["step"] == 2 and math.isfinite(s["final_metrics"]["loss"])
    from transformers import AutoModelForSequenceClassification

    clf = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert clf.config.num_labels == 1  # merged and saved: a plain transformers classifier


def test_resuming_a_finished_run_reports_what_its_last_step_reported(ray_local, toy):
    """--resume of a run that already reached its last step trains nothing and reports that
    step's metrics, training loss included; HPS's held-out loss depends on the step through the
    gamma schedule, so an evaluation one step off would change it."""
    out = toy["dir"] / "hps_resume_finished"
    base = _args("hps", toy, out, "--data", toy["multi"], "--eval-data", toy["multi_eval"], "--strategy", "ddp",
                 "--num-workers", "1", "--hps-mode", "loss", "--gamma-start", "-5", "--gamma-end", "5",
                 "--train-batch-size", "8", "--micro-train-batch-size", "4", "--max-steps", "2", "--no-tensorboard")
    first = _run(base)["final_metrics"]
    again = _run([*base, "--resume"])
    assert again["resumed_from_step"] == 2
    assert {"loss", "eval_loss", "gamma"} <= set(first)
    assert again["final_metrics"] == pytest.approx(first, rel=1e-9)


def _grad_norms(out) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["grad_norm"] for r in map(json.loads, f) if "grad_norm" in r}


def test_zero_stage_0_logs_the_grad_norm_ddp_logs(ray_local, toy):
    """Without ZeRO DeepSpeed keeps no norm for a torch optimizer; prefsel's is DDP's."""
    norms = {}
    for name, flags in (("z0", ("--zero-stage", "0")), ("ddp", ("--strategy", "ddp"))):
        out = toy["dir"] / f"grad_norm_{name}"
        _run(_args("dpo", toy, out, "--data", toy["pairs"], "--num-workers", "1", *flags, *DPO_FLAGS,
                   "--max-steps", "2", "--no-tensorboard"))
        norms[name] = _grad_norms(out)
    print("grad norms zero-0 vs ddp:", norms)
    assert sorted(norms["z0"]) == [1, 2] and all(math.isfinite(v) and v > 0 for v in norms["z0"].values())
    for s in (1, 2):
        assert norms["z0"][s] == pytest.approx(norms["ddp"][s], rel=1e-4)
