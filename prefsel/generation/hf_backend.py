"""The `hf` generation backend: transformers `generate` with per-sample seeded sampling (no Ray here).

Sampling is done by `SeededSampler`, a logits processor that draws each sequence's next token from
its own torch.Generator (seeded by `sample_seed(seed, row_id, k)`) after temperature and top-p,
and hands `generate` a one-hot score so greedy decoding takes exactly that token. A sample thus
depends on its own seed, not on the global RNG or on which other sequences share its batch.
Stopping on EOS, left padding and the KV cache are transformers' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefsel.checks import require
from prefsel.packing import DEFAULT_MAX_TOKENS_PER_BATCH, plan_token_batches


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled, shared by both backends. The defaults make a quick run; the HPS
    paper samples K=100 responses per prompt at temperature 0.9 with up to 2048 new tokens.
    Sample k of row r is seeded from (seed, r, k), so results do not depend on batching
    (up to float rounding of the padded logits, which can move a draw that lands on a boundary)."""

    num_samples: int = 4
    temperature: float = 0.9
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        require((self.num_samples >= 1, "num_samples: must be at least 1"),
                (self.temperature >= 0, "temperature: must be >= 0 (0 means greedy)"),
                (0 < self.top_p <= 1, "top_p: must be in (0, 1]"),
                (self.max_tokens >= 1, "max_tokens: must be at least 1"))


def _filtered_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities (float64) after temperature and nucleus filtering, for one row."""
    logits = logits.double()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p >= top_p  # keep the smallest prefix reaching top_p (always >= 1)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs / probs.sum()


class SeededSampler:
    """LogitsProcessor: picks each row's token with its own generator; returns one-hot scores."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generators = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(s))
            self.generators.append(g)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        for i, g in enumerate(self.generators):
            row = scores[i].float().cpu()
            if self.temperature == 0:
                tok = int(row.argmax())
            else:
                probs = _filtered_probs(row, self.temperature, self.top_p)
                u = torch.rand((), generator=g, dtype=torch.float64)  # one draw per step
                cdf = probs.cumsum(-1)
                tok = int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=probs.numel() - 1))
                while probs[tok] == 0 and tok > 0:  # round-off at the CDF's end
                    tok -= 1
            out[i, tok] = 0.0
        return out


@dataclass
class SampleRequest:
    key: tuple  # (row_id, sample_index) or anything the caller uses to match results
    prompt_ids: list[int]
    seed: int


@dataclass
class SampleResult:
    key: tuple
    token_ids: list[int]  # generated tokens, EOS excluded
    text: str
    finished: bool  # stopped on EOS (False: hit max_tokens)
    error: str | None = None


def _as_ids(value) -> list[int]:
    return [int(value)] if isinstance(value, int) else [int(e) for e in (value or [])]


def model_eos_ids(model) -> list[int]:
    """The EOS ids of a model's generation config (Llama-3-Instruct and Qwen2.5-Instruct list several).

    `model` is a loaded model (its `generation_config`) or a local folder / hub name, whose
    generation_config.json is read without loading weights; without one, config.json's
    `eos_token_id`, as transformers (`GenerationConfig.from_model_config`) and vLLM fall back to.
    [] when neither says. These are stop tokens only: no sampling setting is taken from there.
    """
    if not isinstance(model, str):
        return _as_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    from transformers import GenerationConfig, PretrainedConfig

    try:
        return _as_ids(GenerationConfig.from_pretrained(model).eos_token_id)
    except OSError:  # no generation_config.json
        pass
    try:
        return _as_ids(PretrainedConfig.get_config_dict(model)[0].get("eos_token_id"))
    except OSError:
        return []


def eos_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a response, shared by both backends: the tokenizer's EOS, then the
    model's generation EOS ids (`model_eos_ids`: a loaded model, or its folder / hub name)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for e in model_eos_ids(model) if model is not None else []:
        if e not in ids:
            ids.append(e)
    return ids


def generate_samples(
    model,
    tokenizer,
    requests: Sequence[SampleRequest],
    cfg: SamplingConfig,
    *,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    max_batch_size: int | None = 64,
    device: torch.device | str = "cpu",
) -> list[SampleResult]:
    """Generate one sample per request; results in request order. A batch that fails is split in
    halves down to the request that fails alone, whose result carries the error (so a row's fate
    never depends on its batch-mates); a request that runs out of GPU memory even alone raises
    instead (the chunk fails, and a rerun retries it, rather than rejecting the row for good).

    Only `cfg` decides how tokens are chosen: `generate` fills every setting its config leaves
    unset from `model.generation_config` (the folder's generation_config.json: repetition_penalty,
    no_repeat_ngram_size, min_new_tokens, bad_words_ids, suppress_tokens, ...), whose logits
    processors would run before SeededSampler. So for the call the model carries a blank
    generation config (stop and pad ids only), and gets its own back afterwards. The model's
    generation EOS ids are kept, as stop ids (`eos_ids`). Not thread-safe on a shared model.
    """
    from transformers import GenerationConfig

    stop = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    lengths = [len(r.prompt_ids) + cfg.max_tokens for r in requests]
    results: list[SampleResult | None] = [None] * len(requests)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_tokens, eos_token_id=stop, pad_token_id=pad)
    own_config = model.generation_config  # restored in the finally below
    model.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=pad)
    def run(batch: list[int]) -> None:
        reqs = [requests[i] for i in batch]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(reqs), width), dtype=torch.long)
        for j, r in enumerate(reqs):  # left padding: every prompt ends at the same column
            ids[j, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attn[j, width - len(r.prompt_ids):] = 1
        failure = None
        try:
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen_cfg,
                    logits_processor=[SeededSampler([r.seed for r in reqs], cfg.temperature, cfg.top_p)],
                )
        except Exception as e:  # noqa: BLE001 - reported per row, the run goes on
            if isinstance(e, torch.OutOfMemoryError) and len(batch) == 1:
                raise  # the machine's limit, not the row's: no reject for good; a rerun retries the chunk
            failure = f"generation error: {type(e).__name__}: {e}"[:500]
        if failure is not None:  # out of the except: the failed call's tensors (its traceback) are freed
            del ids, attn
            if len(batch) == 1:
                results[batch[0]] = SampleResult(reqs[0].key, [], "", False, failure)
                return
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            run(batch[: len(batch) // 2])  # halves until the request that fails is alone
            run(batch[len(batch) // 2:])
            return
        new = out[:, width:].tolist()
        for i, r, toks in zip(batch, reqs, new):
            cut = next((k for k, t in enumerate(toks) if t in stop), None)
            finished = cut is not None
            toks = toks[:cut] if finished else toks
            text = tokenizer.decode(toks, skip_special_tokens=True)
            results[i] = SampleResult(r.key, toks, text, finished)

    try:
        for batch in plan_token_batches(lengths, max_tokens_per_batch, max_batch_size):
            run(list(batch))
    finally:
        model.generation_config = own_config
    return results  # type: ignore[return-value]
