"""Prompt rows for generation: validation, prompt token ids (the core's chat-template rules), seeds.

A prompt row is JSON lines / Parquet with `prompt` as a string or a list of chat messages (the
HH-RLHF / PKU-SafeRLHF prompt files of the HPS work); an optional `responses` list of strings is
kept and the new samples are appended to it. Any other fields travel through unchanged, except a
stale `rewards` (it would no longer line up with the extended responses).

Prompt ids come from `PairTokenizer.encode`, the same code that tokenizes prompts for scoring and
reward annotation, so the policy sees its chat template exactly once (one BOS, generation prompt
header appended) and the reward model later sees the same prompt rendering under its own template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from prefsel.formats import Example, RowError, to_example
from prefsel.tokenization import PairTokenizer

_PLACEHOLDER = "x"  # a response to satisfy to_example / encode; only the prompt part is used


@dataclass
class PromptRow:
    example: Example  # prompt only; `responses` holds the existing responses (maybe empty)
    existing: list[str]


def parse_prompt_row(record: Any) -> PromptRow:
    """Validate a prompt row; raises RowError naming the field (empty prompt, bad messages...)."""
    if not isinstance(record, dict):
        raise RowError(f"row: expected a JSON object, got {type(record).__name__}")
    existing = record.get("responses")
    if existing is None:
        existing = []
    probe = {"prompt": record.get("prompt"), "responses": list(existing) if isinstance(existing, list) else existing}
    if isinstance(existing, list) and not existing:
        probe["responses"] = [_PLACEHOLDER]
    ex = to_example(probe, "multi")
    if ex.prompt_messages is not None:
        if ex.prompt_messages[-1]["role"] == "assistant":
            raise RowError("field 'prompt': the last prompt message must not be the assistant's")
        if not any(m["content"].strip() for m in ex.prompt_messages):
            raise RowError("field 'prompt': empty prompt")
    return PromptRow(ex, list(existing))


INT64 = (-(2**63), 2**63)  # the range of the outputs' int64 row_id column


def carried_row_id(record: Any, position: int) -> int:
    """The `row_id` a row keeps through generate, annotate and to-pairs: the record's own integer
    one (a prefsel output's, which may skip the ids of rows rejected earlier), else its position in
    this input. RowError naming the field for one the outputs' int64 column cannot hold."""
    rid = record.get("row_id") if isinstance(record, dict) else None
    if not isinstance(rid, int) or isinstance(rid, bool):
        return position
    if not INT64[0] <= rid < INT64[1]:
        raise RowError(f"field 'row_id': {rid} is outside the 64-bit integers an output row_id holds")
    return rid


def encode_prompt(tokenizer: PairTokenizer, ex: Example) -> list[int]:
    """The prompt's token ids exactly as PairTokenizer.encode produces them (template, one BOS)."""
    return tokenizer.encode_prompt(ex)


def prompt_value(ex: Example) -> Any:
    """The prompt as written to outputs: messages when it was messages, else the text."""
    return ex.prompt_messages if ex.prompt_text is None else ex.prompt_text


def sample_seed(seed: int, row_id: int, sample_index: int) -> int:
    """Seed of one sample: a function of (run seed, row id, sample index) only.

    So a sample is the same (up to the float rounding of its logits) whatever the batching, the
    number of actors or the backend's request order; distinct samples of a row get independent
    streams. Fits vLLM's int seed.
    """
    # a row id is folded to 64 bits: SeedSequence takes no negative entropy (an input's own ids may be)
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(row_id) % 2**64, int(sample_index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF
