"""Preference data formats: detection, validation and normalisation to one canonical example.

Formats (README.md, "Data"):
  pairs         prompt, chosen, rejected; each a string or a list of chat messages
  conversation  chosen, rejected with an implicit prompt (TRL's "implicit prompt" layout): message
                lists sharing all but the last (assistant) message, or plain strings sharing a
                prefix, split where trl.extract_prompt splits them (see _implicit_text)
  hh            HH-RLHF text: "\\n\\nHuman: ... \\n\\nAssistant: ..." with a shared prefix
  multi         prompt, responses (list of strings), rewards (optional list of floats)

A row that cannot be used raises RowError with a reason that names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("pairs", "conversation", "hh", "multi")
ROLES = ("system", "user", "assistant", "tool")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


class RowError(ValueError):
    """A row that cannot be scored; the message is the reject reason and names the field."""


@dataclass
class Example:
    """One preference example in canonical form.

    `prompt_messages` is the conversation before the responses (None for plain-text prompts);
    `prompt_text` is the plain-text prompt (None when the prompt only exists as messages).
    Responses are plain strings (the assistant's content).
    """

    prompt_messages: list[dict] | None
    prompt_text: str | None
    responses: list[str]
    rewards: list[float] | None = None
    conversational: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    multi: bool = False  # responses of a multi-response row (named responses[i], not chosen/rejected)
    # True when the prompt and responses came as chat messages, even if a plain prompt string
    # was also given (H4 UltraFeedback: `prompt` string + message lists): without a chat
    # template such a row is rendered from its messages, exactly like the same content given
    # as message lists only. False for text rows (plain pairs, HH, implicit-prompt strings),
    # whose prompt_text + response is the row's own text, scored verbatim.
    from_messages: bool = False
    prompt_field: str = "prompt"  # the input field holding the prompt (named in reject reasons)

    @property
    def response_names(self) -> list[str]:
        if not self.multi and len(self.responses) == 2:
            return ["chosen", "rejected"]
        return [f"responses[{i}]" for i in range(len(self.responses))]

    @property
    def chosen(self) -> str:
        return self.responses[0]

    @property
    def rejected(self) -> str:
        return self.responses[1]


def detect_format(rows: list[dict]) -> str:
    """Guess the format from sample rows (the first usable row decides)."""
    for row in rows:
        if not isinstance(row, dict):
            continue
        keys = set(row)
        if "responses" in keys and "prompt" in keys:
            return "multi"
        if {"prompt", "chosen", "rejected"} <= keys:
            return "pairs"
        if {"chosen", "rejected"} <= keys:
            c, r = row["chosen"], row["rejected"]
            if isinstance(c, list):
                return "conversation"
            if isinstance(c, str) and HH_ASSISTANT in c:
                return "hh"
            if isinstance(c, str) and isinstance(r, str) and implicit_prompt_split(c, r) > 0:
                return "conversation"  # TRL implicit prompt: plain strings sharing a prefix
    sample_keys = sorted({k for r in rows if isinstance(r, dict) for k in r})
    raise ValueError(
        "cannot detect the data format from fields "
        f"{sample_keys}: expected prompt/chosen/rejected (pairs), chosen/rejected message lists "
        "or strings sharing a prompt prefix (conversation), HH-RLHF chosen/rejected text (hh) "
        "or prompt/responses (multi); "
        "force one with --format"
    )


def _check_messages(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}': expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"field '{name}[{i}]': a message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"field '{name}[{i}].role': unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise RowError(
                f"field '{name}[{i}].content': expected a string, got {type(m['content']).__name__}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_text(value: Any, name: str) -> str:
    if value is None:
        raise RowError(f"field '{name}': missing")
    if not isinstance(value, str):
        raise RowError(f"field '{name}': expected a string or messages, got {type(value).__name__}")
    return value


def _check_response(text: str, name: str) -> str:
    if not text.strip():
        raise RowError(f"field '{name}': empty response")
    return text


def _require(row: dict, names: tuple[str, ...]) -> None:
    for n in names:
        if n not in row or row[n] is None:
            raise RowError(f"field '{n}': missing")


def _response_from(value: Any, name: str, prompt_msgs: list[dict] | None) -> tuple[str, bool]:
    """A response given as text or as messages (a lone assistant turn, or prompt + turn)."""
    if isinstance(value, list):
        msgs = _check_messages(value, name)
        if prompt_msgs is not None and len(msgs) > 1 and msgs[: len(prompt_msgs)] == prompt_msgs:
            msgs = msgs[len(prompt_msgs) :]  # UltraFeedback style: chosen repeats the prompt
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise RowError(
                f"field '{name}': expected one assistant message after the prompt, "
                f"got roles {[m['role'] for m in msgs]}"
            )
        return _check_response(msgs[0]["content"], name), True
    return _check_response(_check_text(value, name), name), False


def _pairs(row: dict) -> Example:
    _require(row, ("prompt", "chosen", "rejected"))
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt_msgs, prompt_text, conv = _check_messages(prompt, "prompt"), None, True
        if prompt_msgs[-1]["role"] == "assistant":
            raise RowError("field 'prompt': the last prompt message must not be the assistant's")
    else:
        prompt_text, prompt_msgs, conv = _check_text(prompt, "prompt"), None, False
    as_msgs = prompt_msgs if prompt_msgs is not None else [{"role": "user", "content": prompt_text}]
    chosen, c_conv = _response_from(row["chosen"], "chosen", as_msgs)
    rejected, r_conv = _response_from(row["rejected"], "rejected", as_msgs)
    conv = conv or c_conv or r_conv
    if conv and prompt_msgs is None:
        prompt_msgs = as_msgs
    return Example(prompt_msgs, prompt_text, [chosen, rejected], conversational=conv, from_messages=conv)


def implicit_prompt_split(chosen: str, rejected: str) -> int:
    """Where trl.extract_prompt cuts two strings: the longest common character prefix, moved
    back by one when the character before the first difference is a space (so " blue." and
    " green." keep their space). Returns 0 when the strings differ from the first character,
    -1 when they never differ (equal, or one a prefix of the other: there trl cuts at an
    arbitrary position, min(len) - 1; we reject such rows instead)."""
    n = min(len(chosen), len(rejected))
    for idx in range(n):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            return idx
    return -1


def _implicit_text(c: str, r: str) -> Example:
    """TRL's standard implicit-prompt layout: chosen/rejected strings that share the prompt."""
    cut = implicit_prompt_split(c, r)
    if cut < 0:
        raise RowError(
            "fields 'chosen'/'rejected': "
            + ("the texts are identical" if c == r else "one text is a prefix of the other")
            + "; no prompt/response boundary"
        )
    if cut == 0:
        raise RowError("fields 'chosen'/'rejected': the texts share no prompt prefix")
    chosen = _check_response(c[cut:], "chosen")
    rejected = _check_response(r[cut:], "rejected")
    return Example(None, c[:cut], [chosen, rejected], conversational=False, prompt_field="chosen")


def _conversation(row: dict) -> Example:
    _require(row, ("chosen", "rejected"))
    if isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        return _implicit_text(row["chosen"], row["rejected"])
    c = _check_messages(row["chosen"], "chosen")
    r = _check_messages(row["rejected"], "rejected")
    for name, msgs in (("chosen", c), ("rejected", r)):
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise RowError(f"field '{name}': needs prompt turns followed by an assistant message")
    if c[:-1] != r[:-1]:
        raise RowError("fields 'chosen'/'rejected': the conversations differ before their last message")
    prompt = c[:-1]
    return Example(
        prompt,
        None,
        [_check_response(c[-1]["content"], "chosen"), _check_response(r[-1]["content"], "rejected")],
        conversational=True,
        from_messages=True,
        prompt_field="chosen",
    )


def parse_hh_turns(text: str, name: str = "chosen") -> list[dict]:
    """Split HH-RLHF text ("\\n\\nHuman: ..\\n\\nAssistant: ..") into messages; `name` is the field."""
    msgs: list[dict] = []
    rest = text
    while rest:
        h, a = rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)
        starts = [(i, tag) for i, tag in ((h, HH_HUMAN), (a, HH_ASSISTANT)) if i >= 0]
        if not starts:
            break
        i, tag = min(starts)
        if msgs:
            msgs[-1]["content"] += rest[:i]
        elif rest[:i].strip():
            raise RowError(f"field '{name}': HH text has content before the first Human/Assistant turn")
        msgs.append({"role": "user" if tag == HH_HUMAN else "assistant", "content": ""})
        rest = rest[i + len(tag) :]
    if msgs:
        msgs[-1]["content"] += rest
    for m in msgs:
        m["content"] = m["content"].strip()
    return msgs


def _hh(row: dict) -> Example:
    _require(row, ("chosen", "rejected"))
    c = _check_text(row["chosen"], "chosen")
    r = _check_text(row["rejected"], "rejected")
    ci, ri = c.rfind(HH_ASSISTANT), r.rfind(HH_ASSISTANT)
    if ci < 0:
        raise RowError("field 'chosen': no '\\n\\nAssistant:' turn in HH text")
    if ri < 0:
        raise RowError("field 'rejected': no '\\n\\nAssistant:' turn in HH text")
    cut = ci + len(HH_ASSISTANT)
    if c[:cut] != r[: ri + len(HH_ASSISTANT)]:
        raise RowError("fields 'chosen'/'rejected': HH texts differ before the last Assistant turn")
    prompt_text = c[:cut]
    msgs = parse_hh_turns(prompt_text)
    if not msgs or msgs[-1]["role"] != "assistant" or msgs[-1]["content"]:
        raise RowError("field 'chosen': HH prompt must end with an empty Assistant turn")
    msgs = msgs[:-1]
    if not any(m["role"] == "user" for m in msgs):
        # Nothing to respond to: the prompt would be empty (or a bare "Assistant:" tag shown as
        # the user's message), so the pair says nothing about responses to a prompt.
        raise RowError("field 'chosen': no '\\n\\nHuman:' turn before the last Assistant turn in HH text")
    chosen = _hh_response(c[cut:], "chosen")
    rejected = _hh_response(r[ri + len(HH_ASSISTANT) :], "rejected")
    return Example(msgs, prompt_text, [chosen, rejected], conversational=True, prompt_field="chosen")


def _hh_response(text: str, name: str) -> str:
    """The text after the last Assistant turn, as the response. A Human turn there would make
    the user's next message part of the response (the last Assistant turn is not the last
    turn), so the row is rejected rather than scored with it."""
    if HH_HUMAN in text:
        raise RowError(f"field '{name}': HH text ends with a '\\n\\nHuman:' turn after the last Assistant turn")
    return _check_response(text, name)


def _multi(row: dict) -> Example:
    _require(row, ("prompt", "responses"))
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt_msgs, prompt_text = _check_messages(prompt, "prompt"), None
    else:
        prompt_msgs, prompt_text = None, _check_text(prompt, "prompt")
        if not prompt_text.strip():
            raise RowError("field 'prompt': empty prompt")
    responses = row["responses"]
    if not isinstance(responses, list) or not responses:
        raise RowError("field 'responses': expected a non-empty list of strings")
    out = []
    for i, x in enumerate(responses):
        if not isinstance(x, str):
            raise RowError(f"field 'responses[{i}]': expected a string, got {type(x).__name__}")
        out.append(_check_response(x, f"responses[{i}]"))
    rewards = row.get("rewards")
    if rewards is not None:
        if not isinstance(rewards, list) or len(rewards) != len(out):
            raise RowError("field 'rewards': expected one number per response")
        for i, v in enumerate(rewards):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RowError(f"field 'rewards[{i}]': expected a finite number, got {v!r}")
        rewards = [float(v) for v in rewards]
    return Example(prompt_msgs, prompt_text, out, rewards, conversational=prompt_msgs is not None, multi=True,
                   from_messages=prompt_msgs is not None)


_PARSERS = {"pairs": _pairs, "conversation": _conversation, "hh": _hh, "multi": _multi}


def to_example(row: Any, fmt: str) -> Example:
    """Validate one raw row of format `fmt` and normalise it; raises RowError naming the field."""
    if fmt not in _PARSERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(row, dict):
        raise RowError(f"row: expected a JSON object, got {type(row).__name__}")
    return _PARSERS[fmt](row)


def core_fields(fmt: str) -> tuple[str, ...]:
    """The fields a format is made of (the rest of a row are extras, kept as they are)."""
    return {
        "pairs": ("prompt", "chosen", "rejected"),
        "conversation": ("chosen", "rejected"),
        "hh": ("chosen", "rejected"),
        "multi": ("prompt", "responses", "rewards"),
    }[fmt]
