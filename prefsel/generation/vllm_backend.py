"""The `vllm` generation backend through Ray Data LLM (`ray.data.llm`, Ray 2.60).

Request shaping and output parsing are pure functions (tested without a GPU); only
`build_vllm_processor` touches `ray.data.llm`, and vLLM itself is imported by Ray's engine actors.

Design points, from ray/llm/_internal/batch/stages/vllm_engine_stage.py (Ray 2.60):
- the engine stage keeps only `outputs[0]` of a request, so `SamplingParams(n=K)` would silently
  return ONE sample. Each prompt is therefore fanned out into K requests with n=1, each with its
  own seed `sample_seed(seed, row_id, k)`; the driver groups them back by row_id;
- the chat template is applied once, by prefsel (PairTokenizer: one BOS, generation header),
  and the request carries `tokenized_prompt`; Ray's chat-template and tokenize stages are off
  (vLLM would otherwise tokenize the rendered text again and add a second BOS);
- detokenization is the engine's own (`generated_text`, special tokens skipped);
  the detokenize stage is off;
- `should_continue_on_error=True`: a failing request comes back with `__inference_error__` set
  (and skips postprocess); its row goes to rejects with the message.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from prefsel.generation.hf_backend import SamplingConfig
from prefsel.generation.prompts import sample_seed

VLLM_INSTALL_HINT = (
    "the vllm backend needs vLLM on the Ray workers (CUDA GPUs): pip install 'prefsel[vllm]' "
    "(or pip install vllm); on CPU machines use --backend hf"
)
ERROR_COLUMN = "__inference_error__"
SAMPLE_COLUMNS = ("row_id", "chunk_id", "sample_index", "sample_text", "sample_tokens", "sample_finished",
                  "sample_error")


def require_vllm() -> None:
    """Fail early, with the install command, when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(VLLM_INSTALL_HINT)


def sampling_params(cfg: SamplingConfig, seed: int, stop_ids: list[int]) -> dict:
    """vllm.SamplingParams kwargs of one sample (n=1: Ray's engine stage keeps outputs[0] only).

    Every filter and penalty is set to off, as the hf backend's sampler has none: temperature
    and top-p alone choose a token, whatever defaults a vLLM release or a model's
    generation_config.json would bring (top_k 0 is off from vLLM 0.9; prefsel needs 0.10)."""
    return {
        "n": 1,
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "min_tokens": 0,
        "max_tokens": int(cfg.max_tokens),
        "seed": int(seed),
        "stop_token_ids": [int(t) for t in stop_ids],
        "skip_special_tokens": True,
        "detokenize": True,
    }


def request_rows(row: dict, cfg: SamplingConfig, stop_ids: list[int]) -> list[dict]:
    """Fan one prepared prompt row out into `num_samples` engine request rows (Ray flat_map fn).

    `row` holds row_id, chunk_id and prompt_ids (the chat-templated prompt, one BOS), and out_id
    and first_sample, which seed sample k by (seed, out_id, first_sample + k) as the hf backend
    does; rows with a reject reason produce no request.
    """
    if row.get("reason"):
        return []
    rid, ids = int(row["row_id"]), [int(t) for t in row["prompt_ids"]]
    seed_id, first = int(row["out_id"]), int(row["first_sample"])
    return [
        {
            "row_id": rid,
            "chunk_id": int(row["chunk_id"]),
            "sample_index": k,
            "tokenized_prompt": ids,
            "sampling_params": sampling_params(cfg, sample_seed(cfg.seed, seed_id, first + k), stop_ids),
        }
        for k in range(cfg.num_samples)
    ]


def parse_output_row(row: dict, stop_ids: list[int]) -> dict:
    """One engine output row -> a sample row (SAMPLE_COLUMNS). Used as the processor's
    postprocess and again on the driver for error rows (which skip postprocess); idempotent.

    Finished means the response ends on a stop token (vLLM keeps it as the last generated token;
    it is not counted). Ray's engine stage emits no finish reason (vLLMOutputData: generated_tokens,
    generated_text, num_generated_tokens, ...), so a response cut by max_tokens or by the model's
    context (vLLM's FINISHED_LENGTH_CAPPED at max_model_len, maybe under max_tokens) is told apart
    only by its last token: `stop_ids` must hold every id vLLM stops on, i.e. `eos_ids(tokenizer,
    model path)`, the generation_config.json EOS ids included; a response is never called
    finished for being short."""
    base = {"row_id": int(row["row_id"]), "chunk_id": int(row["chunk_id"]), "sample_index": int(row["sample_index"])}
    err = row.get(ERROR_COLUMN)
    if not err and row.get("sample_text") is not None:  # already parsed (postprocess ran)
        return {k: row[k] for k in SAMPLE_COLUMNS}
    if err:  # error rows skip postprocess; in a mixed block their sample_* columns are null
        return {**base, "sample_text": "", "sample_tokens": 0, "sample_finished": False,
                "sample_error": f"generation error: {str(err)[:500]}"}
    tokens = [int(t) for t in (row.get("generated_tokens") if row.get("generated_tokens") is not None else [])]
    stopped = bool(tokens) and tokens[-1] in set(stop_ids)
    n = len(tokens) - (1 if stopped else 0)
    text = row.get("generated_text") or ""
    return {**base, "sample_text": str(text), "sample_tokens": n,
            "sample_finished": stopped, "sample_error": None}


def processor_config_kwargs(
    model: str,
    *,
    tensor_parallel_size: int = 1,
    num_replicas: int = 1,
    batch_size: int = 64,
    max_model_len: int | None = None,
    dtype: str = "auto",
    gpu_memory_utilization: float | None = None,
    trust_remote_code: bool = False,
    accelerator_type: str | None = None,
    engine_kwargs: dict | None = None,
) -> dict[str, Any]:
    """Arguments of ray.data.llm.vLLMEngineProcessorConfig (pure, so it is tested on CPU)."""
    ek: dict[str, Any] = {
        "tensor_parallel_size": int(tensor_parallel_size),
        "enable_prefix_caching": True,  # K samples of a prompt share its prefix
        "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype),
        "trust_remote_code": bool(trust_remote_code),
    }
    if max_model_len:
        ek["max_model_len"] = int(max_model_len)
    if gpu_memory_utilization:
        ek["gpu_memory_utilization"] = float(gpu_memory_utilization)
    ek.update(engine_kwargs or {})
    kw: dict[str, Any] = {
        "model_source": model,
        "engine_kwargs": ek,
        "batch_size": int(batch_size),
        "concurrency": int(num_replicas),
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
        "should_continue_on_error": True,
    }
    if accelerator_type:
        kw["accelerator_type"] = accelerator_type
    return kw


def build_vllm_processor(config_kwargs: dict, stop_ids: list[int], *, check: bool = True):
    """The Ray Data LLM processor (vLLMEngineProcessorConfig + build_processor).

    Building needs no vLLM (Ray imports it in the engine actors); `check=False` lets tests build
    the processor on CPU machines to inspect its stages.
    """
    if check:
        require_vllm()
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(**config_kwargs)
    stops = list(stop_ids)

    def postprocess(row: dict) -> dict:
        return parse_output_row(row, stops)

    return build_processor(config, preprocess=None, postprocess=postprocess)
