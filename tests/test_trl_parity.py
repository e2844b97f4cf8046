"""prefsel's DPO objective against TRL's DPOTrainer on the same batch: an independent
implementation of the whole chain (tokenization with BOS/EOS and the prompt/response join,
summed response log-probs, the loss), not just the loss formula.

Not compared: "ipo" (TRL 1.16 divides each log-ratio by its completion length first; prefsel
uses the summed log-ratios, see prefsel/losses.py) and "sigmoid" with label smoothing (TRL 1.16
dropped cDPO smoothing from "sigmoid"); both are covered by the hand-derived values in
tests/test_losses.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from prefsel.demo_data import make_demo_pairs
from prefsel.models import load_causal_lm, load_tokenizer
from prefsel.tokenization import PairTokenizer
from prefsel.train.data import load_rows
from prefsel.train.objectives import LogpModule, dpo_objective

trl = pytest.importorskip("trl")

N = 8
BETA = 0.1


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = make_demo_pairs(N, seed=3, mislabeled=0.0)
    path = tmp_path_factory.mktemp("trl") / "pairs.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    return path


def trl_loss(policy_dir, ref_dir, path, out_dir, loss_type: str, label_smoothing: float) -> float:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = trl.DPOConfig(
        output_dir=str(out_dir), use_cpu=True, report_to="none", per_device_train_batch_size=N,
        beta=BETA, loss_type=[loss_type], label_smoothing=label_smoothing, max_length=None,
        bf16=False,  # TRL 1.16 defaults to bf16 autocast, on CPU too
    )
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32),
        args=cfg, train_dataset=load_dataset("json", data_files=str(path), split="train"),
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
    )
    ds = trainer.train_dataset
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    batch = trainer.data_collator([{c: ds[i][c] for c in cols} for i in range(N)])
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


@pytest.mark.parametrize(("loss_type", "label_smoothing"),
                         [("sigmoid", 0.0), ("hinge", 0.0), ("exo_pair", 1e-3), ("nca_pair", 0.0), ("sppo_hard", 0.0)])
def test_dpo_loss_equals_trl_dpo_trainer_on_the_same_batch(tiny_models, pairs_file, tmp_path, loss_type,
                                                           label_smoothing):
    policy_dir, ref_dir = tiny_models  # different random models: the loss is far from its value at init
    tok = load_tokenizer(policy_dir)
    rows = load_rows(str(pairs_file), "dpo", PairTokenizer(tok, "auto", 2048, "reject")).rows
    assert len(rows) == N
    rows.sort(key=lambda r: r["row_id"])
    policy = load_causal_lm(policy_dir, dtype="float32", device="cpu")
    ref = load_causal_lm(ref_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        ours, _ = dpo_objective(rows, LogpModule(policy), ref, tok.pad_token_id, beta=BETA, loss_type=loss_type,
                                label_smoothing=label_smoothing)
    theirs = trl_loss(policy_dir, ref_dir, pairs_file, tmp_path / "trl", loss_type, label_smoothing)
    assert abs(float(ours) - theirs) <= 1e-5 * max(1.0, abs(theirs)), (float(ours), theirs)
