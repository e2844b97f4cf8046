"""Format detection, normalisation and row validation (prefsel.formats)."""

from __future__ import annotations

import pytest

from prefsel.formats import FORMATS, Example, RowError, detect_format, to_example
from helpers import A, S, U  # chat message builders




# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, "pairs"),
        ({"prompt": [U("Q?")], "chosen": [A("yes")], "rejected": [A("no")]}, "pairs"),
        ({"prompt": "Q?", "chosen": "yes", "rejected": "no", "id": 3, "score": 0.5}, "pairs"),
        ({"chosen": [U("Q?"), A("yes")], "rejected": [U("Q?"), A("no")]}, "conversation"),
        ({"chosen": "\n\nHuman: Q?\n\nAssistant: yes", "rejected": "\n\nHuman: Q?\n\nAssistant: no"}, "hh"),
        ({"prompt": "Q?", "responses": ["a", "b", "c"], "rewards": [1.0, 0.0, 0.5]}, "multi"),
        ({"prompt": "Q?", "responses": ["a", "b"]}, "multi"),
    ],
)
def test_detect_each_format(row, fmt):
    assert detect_format([row]) == fmt


def test_detect_skips_non_dict_rows_and_uses_first_usable():
    rows = [None, "junk", 7, {"prompt": "Q?", "chosen": "a", "rejected": "b"}]
    assert detect_format(rows) == "pairs"


@pytest.mark.parametrize(
    "rows",
    [
        [{"question": "Q?", "answer": "A"}],
        [{"text": "hello"}],
        [{"chosen": "plain text without turns", "rejected": "other"}],
        [],
        ["not a dict"],
    ],
)
def test_detect_unknown_fields_clear_error(rows):
    with pytest.raises(ValueError) as e:
        detect_format(rows)
    msg = str(e.value)
    assert "cannot detect" in msg
    assert "--format" in msg
    for r in rows:
        if isinstance(r, dict):
            for k in r:
                assert repr(k) in msg  # the fields actually seen are listed


def test_to_example_unknown_format():
    with pytest.raises(ValueError, match="unknown format"):
        to_example({"prompt": "x"}, "nope")
    assert set(FORMATS) == {"pairs", "conversation", "hh", "multi"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("row", [None, "a string", 3, ["prompt", "chosen"]])
def test_row_not_an_object(fmt, row):
    with pytest.raises(RowError, match="row: expected a JSON object"):
        to_example(row, fmt)


# --------------------------------------------------------------------------- normalisation


def test_pairs_strings():
    ex = to_example({"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5", "id": 9}, "pairs")
    assert isinstance(ex, Example)
    assert ex.prompt_text == "What is 2+2?"
    assert ex.prompt_messages is None
    assert ex.responses == [" 4", " 5"]  # plain text kept verbatim (leading space matters)
    assert ex.chosen == " 4" and ex.rejected == " 5"
    assert ex.rewards is None
    assert ex.conversational is False


def test_pairs_messages():
    prompt = [S("Be brief."), U("What is 2+2?")]
    ex = to_example({"prompt": prompt, "chosen": [A("4")], "rejected": [A("5")]}, "pairs")
    assert ex.prompt_messages == prompt
    assert ex.prompt_text is None
    assert ex.responses == ["4", "5"]
    assert ex.conversational is True


def test_pairs_message_prompt_string_responses():
    ex = to_example({"prompt": [U("Hi")], "chosen": "Hello!", "rejected": "Go away."}, "pairs")
    assert ex.prompt_messages == [U("Hi")]
    assert ex.responses == ["Hello!", "Go away."]
    assert ex.conversational is True


def test_pairs_string_prompt_message_responses():
    ex = to_example({"prompt": "Hi", "chosen": [A("Hello!")], "rejected": [A("Go away.")]}, "pairs")
    assert ex.prompt_text == "Hi"
    assert ex.prompt_messages == [U("Hi")]
    assert ex.responses == ["Hello!", "Go away."]
    assert ex.conversational is True


def test_pairs_messages_extra_keys_dropped():
    m = {"role": "user", "content": "Hi", "name": "bob", "weight": 1}
    ex = to_example({"prompt": [m], "chosen": [A("a")], "rejected": [A("b")]}, "pairs")
    assert ex.prompt_messages == [U("Hi")]


def test_pairs_ultrafeedback_chosen_repeats_prompt():
    """UltraFeedback: prompt is a string, chosen/rejected are [user prompt, assistant answer]."""
    row = {
        "prompt": "Name a colour.",
        "chosen": [U("Name a colour."), A("Blue.")],
        "rejected": [U("Name a colour."), A("Seven.")],
    }
    ex = to_example(row, "pairs")
    assert ex.responses == ["Blue.", "Seven."]
    assert ex.prompt_messages == [U("Name a colour.")]
    assert ex.prompt_text == "Name a colour."
    assert ex.conversational is True


def test_pairs_repeats_message_prompt():
    prompt = [S("sys"), U("q1"), A("a1"), U("q2")]
    row = {"prompt": prompt, "chosen": [*prompt, A("good")], "rejected": [*prompt, A("bad")]}
    ex = to_example(row, "pairs")
    assert ex.prompt_messages == prompt
    assert ex.responses == ["good", "bad"]


def test_pairs_repeated_prompt_that_differs_is_rejected():
    row = {
        "prompt": "Name a colour.",
        "chosen": [U("Name a shape."), A("Square.")],
        "rejected": [A("Seven.")],
    }
    with pytest.raises(RowError, match="field 'chosen'") as e:
        to_example(row, "pairs")
    assert "assistant" in str(e.value)


def test_conversation_normalisation():
    prefix = [S("sys"), U("q1"), A("a1"), U("q2")]
    row = {"chosen": [*prefix, A("good")], "rejected": [*prefix, A("bad")], "source": "x"}
    ex = to_example(row, "conversation")
    assert ex.prompt_messages == prefix
    assert ex.prompt_text is None
    assert ex.responses == ["good", "bad"]
    assert ex.conversational is True


def test_hh_normalisation():
    prefix = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: What is 2+2?\n\nAssistant:"
    row = {"chosen": prefix + " It is 4.", "rejected": prefix + " It is 5."}
    ex = to_example(row, "hh")
    assert ex.prompt_text == prefix
    assert ex.prompt_messages == [U("Hi there"), A("Hello."), U("What is 2+2?")]
    assert ex.responses == [" It is 4.", " It is 5."]
    assert ex.conversational is True
    # the raw text is recovered exactly from prompt_text + response
    assert ex.prompt_text + ex.chosen == row["chosen"]
    assert ex.prompt_text + ex.rejected == row["rejected"]


def test_multi_normalisation():
    row = {"prompt": "Q?", "responses": ["a", "b", "c"], "rewards": [1, 0.5, -2]}
    ex = to_example(row, "multi")
    assert ex.prompt_text == "Q?"
    assert ex.prompt_messages is None
    assert ex.responses == ["a", "b", "c"]
    assert ex.rewards == [1.0, 0.5, -2.0]
    assert all(isinstance(v, float) for v in ex.rewards)
    assert ex.conversational is False


def test_multi_without_rewards_and_message_prompt():
    ex = to_example({"prompt": [U("Q?")], "responses": ["a", "b"]}, "multi")
    assert ex.rewards is None
    assert ex.prompt_messages == [U("Q?")]
    assert ex.conversational is True
    ex = to_example({"prompt": "Q?", "responses": ["a", "b"], "rewards": None}, "multi")
    assert ex.rewards is None


# --------------------------------------------------------------------------- broken rows


def _raises_naming(row, fmt, field):
    with pytest.raises(RowError) as e:
        to_example(row, fmt)
    msg = str(e.value)
    assert f"'{field}" in msg, f"reason {msg!r} does not name field {field!r}"
    return msg


PAIRS_OK = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_pairs_missing_field(field):
    row = {k: v for k, v in PAIRS_OK.items() if k != field}
    msg = _raises_naming(row, "pairs", field)
    assert "missing" in msg
    msg = _raises_naming({**PAIRS_OK, field: None}, "pairs", field)
    assert "missing" in msg


@pytest.mark.parametrize("field", ["chosen", "rejected"])
@pytest.mark.parametrize("value", ["", "   ", "\n\t ", [A("")], [A("  \n")]])
def test_pairs_empty_response(field, value):
    msg = _raises_naming({**PAIRS_OK, field: value}, "pairs", field)
    assert "empty" in msg


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
@pytest.mark.parametrize("value, tname", [(3, "int"), ({"role": "user", "content": "x"}, "dict"), (1.5, "float"), (True, "bool")])
def test_pairs_wrong_type(field, value, tname):
    msg = _raises_naming({**PAIRS_OK, field: value}, "pairs", field)
    assert tname in msg


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
@pytest.mark.parametrize(
    "bad, where, words",
    [
        ([], "", "non-empty list"),
        ([{"content": "x"}], "[0]", "role"),
        ([{"role": "user"}], "[0]", "content"),
        (["just a string"], "[0]", "role"),
        ([{"role": "robot", "content": "x"}], "[0].role", "unknown role"),
        ([{"role": "user", "content": 5}], "[0].content", "int"),
        ([{"role": "user", "content": None}], "[0].content", "NoneType"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "[0].content", "list"),
    ],
)
def test_pairs_malformed_messages(field, bad, where, words):
    msg = _raises_naming({**PAIRS_OK, field: bad}, "pairs", field + where)
    assert words in msg


def test_pairs_malformed_message_index_is_reported():
    prompt = [S("ok"), U("ok"), {"role": "user", "content": 3}]
    msg = _raises_naming({**PAIRS_OK, "prompt": prompt}, "pairs", "prompt[2].content")
    assert "int" in msg


def test_pairs_prompt_ending_with_assistant():
    msg = _raises_naming({**PAIRS_OK, "prompt": [U("q"), A("a")]}, "pairs", "prompt")
    assert "assistant" in msg


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_pairs_response_messages_not_one_assistant_turn(field):
    for bad in ([U("hi")], [A("a"), A("b")], [A("a"), U("b")]):
        msg = _raises_naming({**PAIRS_OK, field: bad}, "pairs", field)
        assert "assistant" in msg


CONV_OK = {"chosen": [U("Q?"), A("yes")], "rejected": [U("Q?"), A("no")]}


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_conversation_missing_field(field):
    row = {k: v for k, v in CONV_OK.items() if k != field}
    assert "missing" in _raises_naming(row, "conversation", field)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
@pytest.mark.parametrize("content", ["", "  ", "\n"])
def test_conversation_empty_response(field, content):
    row = {**CONV_OK, field: [U("Q?"), A(content)]}
    assert "empty" in _raises_naming(row, "conversation", field)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
@pytest.mark.parametrize("value", [3, {"role": "user"}, "text", None])
def test_conversation_wrong_type(field, value):
    _raises_naming({**CONV_OK, field: value}, "conversation", field)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
@pytest.mark.parametrize(
    "msgs, where",
    [
        ([{"content": "Q?"}, A("x")], "[0]"),
        ([U("Q?"), {"role": "assistant"}], "[1]"),
        ([{"role": "human", "content": "Q?"}, A("x")], "[0].role"),
        ([U("Q?"), {"role": "assistant", "content": 42}], "[1].content"),
        ([U("Q?"), {"role": "assistant", "content": {"text": "x"}}], "[1].content"),
    ],
)
def test_conversation_malformed_messages(field, msgs, where):
    _raises_naming({**CONV_OK, field: msgs}, "conversation", field + where)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
@pytest.mark.parametrize("msgs", [[A("only")], [U("Q?")], [U("Q?"), A("x"), U("again")]])
def test_conversation_needs_prompt_then_assistant(field, msgs):
    _raises_naming({**CONV_OK, field: msgs}, "conversation", field)


@pytest.mark.parametrize(
    "rejected",
    [
        [U("Other question?"), A("no")],
        [S("sys"), U("Q?"), A("no")],
        [U("Q?"), A("first"), U("Q?"), A("no")],
        [{"role": "system", "content": "Q?"}, A("no")],
    ],
)
def test_conversation_prefixes_differ(rejected):
    row = {"chosen": [U("Q?"), A("yes")], "rejected": rejected}
    with pytest.raises(RowError) as e:
        to_example(row, "conversation")
    msg = str(e.value)
    assert "'chosen'" in msg and "'rejected'" in msg
    assert "differ" in msg


HH_P = "\n\nHuman: Q?\n\nAssistant:"
HH_OK = {"chosen": HH_P + " yes", "rejected": HH_P + " no"}


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_hh_missing_field(field):
    row = {k: v for k, v in HH_OK.items() if k != field}
    assert "missing" in _raises_naming(row, "hh", field)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
@pytest.mark.parametrize("value, tname", [(3, "int"), ({"text": "x"}, "dict"), ([U("x")], "list")])
def test_hh_wrong_type(field, value, tname):
    assert tname in _raises_naming({**HH_OK, field: value}, "hh", field)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
@pytest.mark.parametrize("tail", ["", " ", "  \n "])
def test_hh_empty_response(field, tail):
    assert "empty" in _raises_naming({**HH_OK, field: HH_P + tail}, "hh", field)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_hh_without_assistant_turn(field):
    msg = _raises_naming({**HH_OK, field: "\n\nHuman: Q? yes"}, "hh", field)
    assert "Assistant" in msg


@pytest.mark.parametrize(
    "rejected",
    [
        "\n\nHuman: Other?\n\nAssistant: no",
        "\n\nHuman: Q?\n\nAssistant: hm\n\nHuman: Q?\n\nAssistant: no",
        "\n\nHuman:  Q?\n\nAssistant: no",
    ],
)
def test_hh_prefixes_differ(rejected):
    with pytest.raises(RowError) as e:
        to_example({"chosen": HH_OK["chosen"], "rejected": rejected}, "hh")
    msg = str(e.value)
    assert "'chosen'" in msg and "'rejected'" in msg
    assert "differ" in msg


@pytest.mark.parametrize("field", ["chosen", "rejected"])
@pytest.mark.parametrize("tail", ["\n\nHuman: thanks", "\n\nHuman:", "\n\nHuman: ok\n\nAssistant"])
def test_hh_human_turn_after_the_last_assistant_turn_is_rejected(field, tail):
    # else the user's next message would be scored as part of the response
    row = {**HH_OK, field: HH_OK[field] + tail}
    assert "Human" in _raises_naming(row, "hh", field)


def test_hh_without_human_turn_is_rejected():
    # else the prompt is empty and a bare "Assistant:" tag is rendered as the user's message
    msg = _raises_naming({"chosen": "\n\nAssistant: b", "rejected": "\n\nAssistant: c"}, "hh", "chosen")
    assert "Human" in msg


def test_hh_text_before_first_turn_names_field():
    row = {"chosen": "Preamble" + HH_OK["chosen"], "rejected": "Preamble" + HH_OK["rejected"]}
    _raises_naming(row, "hh", "chosen")


MULTI_OK = {"prompt": "Q?", "responses": ["a", "b", "c"], "rewards": [0.1, 0.2, 0.3]}


@pytest.mark.parametrize("field", ["prompt", "responses"])
def test_multi_missing_field(field):
    row = {k: v for k, v in MULTI_OK.items() if k != field}
    assert "missing" in _raises_naming(row, "multi", field)


@pytest.mark.parametrize("rewards", [[0.1, 0.2], [0.1, 0.2, 0.3, 0.4], [], 0.5, "0.1,0.2,0.3"])
def test_multi_rewards_length_or_type_mismatch(rewards):
    assert "one number per response" in _raises_naming({**MULTI_OK, "rewards": rewards}, "multi", "rewards")


@pytest.mark.parametrize("bad", ["0.3", None, True, float("nan"), [1.0]])
def test_multi_reward_not_a_number(bad):
    _raises_naming({**MULTI_OK, "rewards": [0.1, 0.2, bad]}, "multi", "rewards[2]")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_multi_reward_infinite(bad):
    _raises_naming({**MULTI_OK, "rewards": [0.1, 0.2, bad]}, "multi", "rewards[2]")


@pytest.mark.parametrize("value", ["a single string", [], 3, {"0": "a"}])
def test_multi_responses_not_a_list(value):
    _raises_naming({**MULTI_OK, "responses": value, "rewards": None}, "multi", "responses")


@pytest.mark.parametrize("bad, tname", [(3, "int"), ({"text": "x"}, "dict"), (None, "NoneType")])
def test_multi_response_wrong_type(bad, tname):
    row = {**MULTI_OK, "responses": ["a", bad, "c"]}
    assert tname in _raises_naming(row, "multi", "responses[1]")


@pytest.mark.parametrize("blank", ["", "  ", "\n"])
def test_multi_empty_response(blank):
    row = {**MULTI_OK, "responses": ["a", "b", blank]}
    assert "empty" in _raises_naming(row, "multi", "responses[2]")


@pytest.mark.parametrize("prompt, field", [("", "prompt"), ("  ", "prompt"), (7, "prompt"), ([{"role": "x", "content": "q"}], "prompt[0].role")])
def test_multi_bad_prompt(prompt, field):
    _raises_naming({**MULTI_OK, "prompt": prompt}, "multi", field)
