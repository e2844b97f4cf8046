"""Loading models and tokenizers with transformers, from a local folder or a hub name."""

from __future__ import annotations

import torch

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def resolve_device(device: str | None = None) -> torch.device:
    """`auto` (or None) picks the visible GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device):
    """`auto` means bf16 on GPU and float32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """A tokenizer with a pad token (EOS stands in when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"{name_or_path}: tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
):
    """An eval-mode causal LM on `device`, weights in `dtype`, gradients off."""
    from transformers import AutoModelForCausalLM

    from prefsel.packing import resolve_attn

    dev = resolve_device(device)
    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = resolve_attn(attn_implementation, dev)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=resolve_dtype(dtype, dev),
        trust_remote_code=trust_remote_code,
        revision=revision,
        **kwargs,
    )
    model.to(dev).eval()
    model.requires_grad_(False)
    return model


# transformers sets model_max_length to int(1e30) when a tokenizer does not say; anything this
# large means "unset", never a real context.
_UNSET_LENGTH = 10**12
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def _config_positions(config) -> tuple[int, str] | None:
    """(positions, the config key that says so) of a model config (its text part for multimodal
    configs), or None."""
    from prefsel.packing import text_config

    text = text_config(config)
    for cfg in (text, config) if text is not config else (config,):
        for key in _POSITION_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _UNSET_LENGTH:
                return value, key
    return None


def model_positions(
    config_or_path, *, trust_remote_code: bool = False, revision: str | None = None
) -> tuple[int, str] | None:
    """The fewest positions among the model configs, with where that number comes from
    ("max_position_embeddings of PATH's config"), or None when no config says.

    `config_or_path` is a local folder or a hub name (read with AutoConfig, no weights loaded),
    a config, a model, or a list / tuple of these (policy and reference)."""
    from transformers import AutoConfig, PretrainedConfig

    items = list(config_or_path) if isinstance(config_or_path, (list, tuple)) else [config_or_path]
    best = None
    for item in items:
        if item is None:
            continue
        if isinstance(item, PretrainedConfig):
            config, name = item, item.name_or_path
        elif hasattr(item, "config") and isinstance(item.config, PretrainedConfig):
            config, name = item.config, item.config.name_or_path  # a loaded model
        else:
            config = AutoConfig.from_pretrained(str(item), trust_remote_code=trust_remote_code, revision=revision)
            name = str(item)
        found = _config_positions(config)
        if found is not None and (best is None or found[0] < best[0]):
            best = found[0], f"{found[1]} of {name or type(config).__name__}'s config"
    return best


def model_context_length(
    tokenizer, config_or_path, *, trust_remote_code: bool = False, revision: str | None = None
) -> int | None:
    """The longest sequence (prompt + response tokens) the model can take, or None if unknown.

    The smaller of the model configs' positions (`model_positions`: `max_position_embeddings`,
    or `n_positions` / `n_ctx` for GPT-2 style configs) and the tokenizer's `model_max_length`
    (ignored when it is transformers' "unset" sentinel, about 1e30). `config_or_path` is as for
    `model_positions` (policy and reference: the smallest). `tokenizer` may be None.
    """
    positions = model_positions(config_or_path, trust_remote_code=trust_remote_code, revision=revision)
    lengths = [positions[0]] if positions else []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and not isinstance(tok_max, bool) and 0 < tok_max < _UNSET_LENGTH:
        lengths.append(tok_max)
    return min(lengths) if lengths else None


def check_max_length(
    max_length: int,
    config_or_path,
    *,
    field: str = "max_length",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> None:
    """Refuse a length the models cannot take: ValueError naming `field` (the CLI turns it into
    the flag), the value and the limit with where it comes from, when `max_length` exceeds the
    positions of any of the models (`model_positions`; unknown positions: no refusal).

    A sequence that long would crash a learned-position model in the forward (IndexError; on
    CUDA a device-side assert that breaks the process) or be silently scored past a rotary
    model's trained range. The limit is the configs' positions, the hard one; the tokenizer's
    `model_max_length` (often mis-set) only shapes the default, `model_context_length`.
    """
    positions = model_positions(config_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if positions is not None and max_length > positions[0]:
        limit, source = positions
        raise ValueError(f"{field}: {max_length} exceeds the models' {limit} positions ({source}); "
                         f"give at most {limit}")


def resolve_max_length(
    max_length: int | None,
    tokenizer,
    config_or_path,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> int | None:
    """The length to tokenize with: the models' context (`model_context_length`) when
    `max_length` is None, else `max_length` once `check_max_length` accepts it."""
    if max_length is None:
        return model_context_length(tokenizer, config_or_path, trust_remote_code=trust_remote_code, revision=revision)
    check_max_length(max_length, config_or_path, trust_remote_code=trust_remote_code, revision=revision)
    return max_length


def check_same_vocab(tokenizer, *models) -> None:
    """Policy and reference must share the tokenizer's vocabulary, or their log-probs disagree."""
    n = len(tokenizer)
    for m in models:
        size = m.get_output_embeddings().weight.shape[0]
        if size < n:
            raise ValueError(
                f"model {m.config.name_or_path or type(m).__name__} has {size} output tokens but the "
                f"tokenizer has {n}: policy and reference must use the same tokenizer"
            )
