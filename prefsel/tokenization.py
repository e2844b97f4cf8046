"""Turn canonical examples into token ids: prompt and each response tokenized separately.

Why separately: tokenizing prompt+response as one string lets BPE merge across the join, and
then no token boundary matches the prompt/response boundary (the published script's fault).
Here the prompt ids and the response ids are produced on their own and concatenated as ids, so
the scored tokens are exactly the response's. Rules:

- a chat template is applied when the data is conversational and the tokenizer has one
  (`chat_template="auto"`), never (`"none"`), or always with a template read from a file;
- exactly one BOS, at the start, when the tokenizer uses one (templates that write BOS into the
  text do not produce a second);
- the response ends with EOS unless the template already closes the turn with a special token;
- over-long rows are rejected, or with `truncation="prompt-left"` lose prompt tokens from the
  left; the response is never cut;
- `strip_responses` (default True): the responses of conversational rows (chat messages, HH
  turns) lose leading/trailing whitespace before rendering, as most chat templates' own
  `| trim` does; False keeps them verbatim, as TRL does. Plain-text rows (a text prompt with
  text responses, implicit-prompt strings) are never stripped: there the text is the data;
- `exact_continuation` (default True): a response is tokenized as the continuation of the
  rendered text, so a SentencePiece tokenizer does not give it the leading "▁" (word start)
  it gives a text of its own (`[/INST]The` tokenizes as `The`, not `▁The`); False tokenizes
  each response on its own, as TRL does. Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen)
  add no such prefix: for them both settings give the same ids;
- a row the chat template rejects (jinja's `raise_exception`, e.g. "System role not
  supported", or any other template error) is a RowError naming the field, never a crash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError

from prefsel.formats import Example, RowError

TRUNCATION_MODES = ("reject", "prompt-left")


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example: the prompt once, and each response (chosen first for pairs)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]

    @property
    def chosen_ids(self) -> list[int]:
        return self.response_ids[0]

    @property
    def rejected_ids(self) -> list[int]:
        return self.response_ids[1]


def _plain_prompt_from_messages(msgs: list[dict]) -> str:
    """Plain-text rendering for conversational data scored without a template (HH-RLHF style)."""
    names = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in msgs) + "\n\nAssistant:"


CHAT_TEMPLATE_MODES = ("auto", "none")


def check_chat_template(chat_template: str) -> str:
    """--chat-template as a run uses it: "auto" or "none" as they are, a template file as its
    absolute path (Ray workers and Serve replicas do not share the driver's cwd). The one check of
    the value, made where each run starts (job, train and serve configs) and again here;
    ValueError naming the field otherwise."""
    if chat_template in CHAT_TEMPLATE_MODES:
        return chat_template
    if not Path(chat_template).is_file():
        raise ValueError(f"chat_template: expected auto, none or a template file, got {chat_template!r}")
    return os.path.abspath(chat_template)


class PairTokenizer:
    """Encodes examples for scoring and training, with the rules in the module docstring."""

    def __init__(
        self,
        tokenizer,
        chat_template: str = "auto",
        max_length: int | None = None,
        truncation: str = "reject",
        strip_responses: bool = True,
        exact_continuation: bool = True,
    ) -> None:
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
        if max_length is not None and max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.strip_responses = strip_responses
        self.exact_continuation = exact_continuation
        self.mode = chat_template
        self.template: str | None
        if chat_template == "auto":
            self.template = getattr(tokenizer, "chat_template", None) or None
        elif chat_template == "none":
            self.template = None
        else:
            self.template = Path(check_chat_template(chat_template)).read_text()
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        # Only tokenizers that add BOS themselves (Llama, Mistral) get one; Qwen/GPT-2 do not.
        self.bos_id: int | None = bos if bos is not None and probe[:1] == [bos] else None
        self.eos_id: int | None = tokenizer.eos_token_id
        self.special_ids = set(tokenizer.all_special_ids)
        # SentencePiece-style tokenizers (Metaspace / add_dummy_prefix) mark the start of every
        # text they are given as a word start ("▁"), even where the text continues a word.
        first = tokenizer.convert_ids_to_tokens(self._ids("a")[:1])
        self.dummy_prefix = bool(first) and isinstance(first[0], str) and first[0].startswith("\u2581")

    def uses_template(self, ex: Example) -> bool:
        if self.template is None:
            return False
        return self.mode != "auto" or ex.conversational

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _response_ids(self, text: str) -> list[int]:
        """Ids of a response that continues the prompt's text (see `exact_continuation`)."""
        if not (self.dummy_prefix and self.exact_continuation):
            return self._ids(text)
        # Tokenize behind an anchor that cannot merge with what follows and drop the anchor's
        # ids: the response is then tokenized mid-text, without the "▁" of a text start.
        anchor = self._ids("\n")
        ids = self._ids("\n" + text)
        if ids[: len(anchor)] == anchor:
            return ids[len(anchor) :]
        return self._ids(text)  # pragma: no cover - an anchor that merged: tokenize on its own

    def _render(self, msgs: list[dict], generation_prompt: bool, field: str = "prompt") -> str:
        try:
            return self.tokenizer.apply_chat_template(
                msgs, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except (TemplateError, TypeError, KeyError, IndexError, ValueError) as e:
            # A row the template refuses (raise_exception in the template, e.g. a system turn
            # under a template without one) is a reject, not the end of the job.
            raise RowError(f"field '{field}': chat template error: {e}") from None

    def _response_text(self, resp: str) -> str:
        return resp.strip() if self.strip_responses else resp

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.bos_id if self.bos_id is not None else self.tokenizer.bos_token_id
        start = 0
        while start < len(ids) and bos is not None and ids[start] == bos:
            start += 1
        had_bos = start > 0
        ids = ids[start:]
        if self.bos_id is not None or had_bos:
            ids = [bos, *ids]
        return ids

    def _prompt_text(self, ex: Example) -> str:
        """The prompt as the model sees it: rendered by the template, or plain text."""
        if self.uses_template(ex):
            msgs = ex.prompt_messages or [{"role": "user", "content": ex.prompt_text or ""}]
            return self._render(msgs, True, ex.prompt_field)
        if ex.prompt_text is not None and not (ex.from_messages and ex.prompt_messages):
            return ex.prompt_text
        return _plain_prompt_from_messages(ex.prompt_messages or [])

    def encode_prompt(self, ex: Example) -> list[int]:
        """The prompt's ids (template applied once, exactly one BOS), e.g. to generate from.

        No max_length is applied here; `encode` applies it to prompt and responses together.
        """
        return self._with_bos(self._ids(self._prompt_text(ex)))

    def encode(self, ex: Example) -> TokenizedExample:
        """Token ids for the prompt and each response; raises RowError for unusable rows."""
        prompt_str = self._prompt_text(ex)
        prompt_ids = self._with_bos(self._ids(prompt_str))
        responses = []
        if self.uses_template(ex):
            msgs = ex.prompt_messages or [{"role": "user", "content": ex.prompt_text or ""}]
            for i, resp in enumerate(ex.responses):
                name = ex.response_names[i]
                full = self._render([*msgs, {"role": "assistant", "content": self._response_text(resp)}], False, name)
                if not full.startswith(prompt_str):
                    raise RowError(
                        f"field '{name}': chat template: the conversation with this response does not "
                        "start with the rendered prompt; cannot find the response boundary"
                    )
                ids = self._response_ids(full[len(prompt_str) :])
                if self.eos_id is not None and not self.special_ids.intersection(ids):
                    ids.append(self.eos_id)
                responses.append(ids)
        else:
            plain = ex.prompt_text is not None and not (ex.from_messages and ex.prompt_messages)
            for r in ex.responses:
                ids = self._response_ids(r if plain else " " + self._response_text(r))
                if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                    ids.append(self.eos_id)
                responses.append(ids)
        names = ex.response_names
        for name, ids in zip(names, responses):
            if not ids:
                raise RowError(f"field '{name}': no tokens")
        if not prompt_ids:
            raise RowError("field 'prompt': no tokens (the first response token would have no context)")
        return self._fit(prompt_ids, responses, names, ex.prompt_field)

    def _fit(self, prompt_ids: list[int], responses: list[list[int]], names: list[str],
             prompt_field: str = "prompt") -> TokenizedExample:
        """The row within max_length: as it is, or (prompt-left) with the prompt cut from the
        left down to what the longest response leaves, keeping BOS and at least one token.

        An over-long row names the field at fault: the longest response when it does not fit
        even after that one token of prompt (no truncation of the prompt can help), else the
        prompt (`prompt_field`, where the prompt lives): the rows prompt-left would keep."""
        if self.max_length is None:
            return TokenizedExample(prompt_ids, responses)
        longest = max(len(r) for r in responses)
        if len(prompt_ids) + longest <= self.max_length:
            return TokenizedExample(prompt_ids, responses)
        which = names[max(range(len(responses)), key=lambda i: len(responses[i]))]
        detail = (
            f"prompt {len(prompt_ids)} + {which} {longest} = {len(prompt_ids) + longest} tokens "
            f"> max_length {self.max_length}"
        )
        # the BOS _with_bos kept: the tokenizer's own, or one the template writes (DeepSeek-V3 style)
        bos = self.bos_id if self.bos_id is not None else self.tokenizer.bos_token_id
        head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
        keep = self.max_length - longest - len(head)  # prompt tokens (after BOS) the response leaves room for
        if keep < 1:
            if self.truncation == "reject":
                raise RowError(f"field '{which}': too long: {detail}")
            raise RowError(f"field '{which}': response alone too long to fit: {detail}")
        if self.truncation == "reject":
            raise RowError(f"field '{prompt_field}': too long: {detail} "
                           f"(the prompt leaves no room for {which}; --truncation prompt-left keeps its end)")
        return TokenizedExample(head + prompt_ids[len(head) :][-keep:], responses)


def rendering_note(fmt: str, tokenizer: PairTokenizer, sample: dict | None = None) -> str | None:
    """What the model is shown for this data, in one sentence, where it is not the row's text
    as written (for the run summary and the console); None when rows are scored as written."""
    conv_rows = fmt in ("hh", "conversation") or (
        sample is not None and fmt in ("pairs", "multi")
        and any(isinstance(sample.get(k), list) for k in ("prompt", "chosen", "rejected"))
    )
    if fmt == "conversation" and sample is not None and isinstance(sample.get("chosen"), str):
        return ("chosen/rejected are plain strings with an implicit prompt: the prompt is their longest "
                "common prefix, cut as trl.extract_prompt cuts it, and the texts are scored as written")
    if fmt == "hh":
        if tokenizer.template is None:
            return None  # HH text is scored as written
        return ("HH-RLHF text is parsed into chat messages and rendered with the chat template "
                "(--chat-template none scores the text as written)")
    if conv_rows and tokenizer.template is None:
        return ("no chat template: chat messages are rendered as plain text "
                "'\\n\\nHuman: ...\\n\\nAssistant: <response>'")
    return None
