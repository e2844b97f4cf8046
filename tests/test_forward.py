"""The one forward (prefsel.logprobs): a reward model is read the same way by training, the demo's
evaluation and annotation, whatever the padding side and whatever its head is called."""

from __future__ import annotations

import pytest
import torch

from prefsel.logprobs import backbone_and_head, collate_sequences, sequence_rewards
from prefsel.models import load_tokenizer


@pytest.fixture(scope="module")
def rm_and_rows(tiny_models, tmp_path_factory):
    from prefsel.generation.rewards import load_reward_model
    from prefsel.generation.tiny_rm import build_tiny_reward_model

    tok = load_tokenizer(tiny_models[0])
    path = build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", tok)
    model = load_reward_model(path, dtype="fp32", device="cpu")
    prompts = [tok(t)["input_ids"] for t in ("Q: two plus two?", "Q: a much longer question about the sea?", "Hi")]
    responses = [tok(t)["input_ids"] + [tok.eos_token_id] for t in (" four", " it is blue and deep", " hello there")]
    return model, tok, prompts, responses


def _one_by_one(model, prompts, responses) -> list[float]:
    """Independent reading: each sequence alone, unpadded, the head at its last token."""
    backbone, head = backbone_and_head(model, "reward")
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([[*p, *r]])
            hidden = backbone(input_ids=ids).last_hidden_state
            out.append(float(head(hidden[0, -1]).float()[0]))
    return out


def test_trainer_demo_and_annotate_read_the_same_rewards(rm_and_rows):
    from prefsel.generation.rewards import score_groups
    from prefsel.logprobs import padded_batch
    from prefsel.packing import Layout, one_batch
    from prefsel.train.objectives import RewardModule

    model, tok, prompts, responses = rm_and_rows
    want = _one_by_one(model, prompts, responses)
    groups = [(p, [r]) for p, r in zip(prompts, responses)]
    with torch.no_grad():
        for side in ("right", "left"):
            ids, attn, _ = collate_sequences(prompts, responses, tok.pad_token_id, side)
            trainer = RewardModule(model)(padded_batch(ids, attn)).tolist()  # padded rows
            assert trainer == pytest.approx(want, abs=1e-5), side
        batch = one_batch(groups, tok.pad_token_id, Layout())  # RM training's packed micro-batch
        assert batch.in_order(RewardModule(model)(batch)).tolist() == pytest.approx(want, abs=1e-5)
    for budget in (10_000, 8):  # batched together, or one sequence per batch; annotate and the demo's eval_rm
        for layout in (Layout(max_tokens=budget), Layout(max_tokens=budget, packing=False)):
            annotate = score_groups(model, groups, tok.pad_token_id, layout=layout)
            assert annotate == pytest.approx(want, abs=1e-5)


def test_any_head_name_and_pad_equal_to_eos(rm_and_rows):
    model, tok, prompts, responses = rm_and_rows
    want = _one_by_one(model, prompts, responses)
    ids, attn, _ = collate_sequences(prompts, responses, tok.eos_token_id, "right")  # pad id == EOS id
    with torch.no_grad():
        assert sequence_rewards(model, ids, attn).tolist() == pytest.approx(want, abs=1e-5)
        head = model.score
        del model.score
        model.v_head = head
        try:
            assert sequence_rewards(model, ids, attn).tolist() == pytest.approx(want, abs=1e-5)
        finally:
            del model.v_head
            model.score = head


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(TypeError, match="expected a sequence classifier"):
        sequence_rewards(torch.nn.Linear(2, 1), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
