"""Data fidelity (issue 17): every row comes out exactly as it went in, every real layout is read.

Layout files under tests/data/ are hand-written (tests/data/build_layouts.py writes them):
H4 UltraFeedback, trl-lib UltraFeedback, TRL's implicit-prompt strings, HH-RLHF text; a
DatasetDict save_to_disk folder is built from them here. They go through the real score job
and selection and come back compared field by field.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import A, S, U, read_rejects, read_scores, write_jsonl
from prefsel.formats import RowError, detect_format, implicit_prompt_split, to_example
from prefsel.prepare import MISSING_KEY, check_record, infer_schema, record_schema, restore_record, same_value, split_record
from prefsel.summary import reason_kind, all_rejected_error
from prefsel.tokenization import PairTokenizer, rendering_note

DATA = Path(__file__).parent / "data"


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _strip_added(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("row_id", "gap")}


# --------------------------------------------------------------------------- 1. no silent change


def _drift_rows(n: int = 300, seed: int = 7) -> list[dict]:
    """Rows whose types drift after the sampled first rows (the schema is inferred from 256)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        late = i >= 280
        msg = {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}
        if late and i % 2:
            msg["name"] = "alice"  # a message key first seen after the sample
        row = {
            "id": i,
            "prompt": [msg],
            "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"It is {2 * i + rng.randint(1, 9)}."}],
            "score": 7.5 if late else rng.randint(0, 10),  # int in the sample, 7.5 later
            "ratio": 3 if late and i % 3 == 0 else rng.random(),  # float in the sample, an int later
            "flag": 1 if late and i % 5 == 0 else bool(i % 2),  # bool in the sample, 1 later
            "meta": {"src": "web", "n": i} if not (late and i % 4 == 0) else {"src": "web", "n": i, "lang": "en"},
            "tags": ["a", "b"][: 1 + i % 2] if not (late and i % 7 == 0) else ["a", 3],
            "big": i if not (late and i % 6 == 0) else 2**70,  # does not fit int64
        }
        if late and i % 3 == 1:
            del row["meta"]  # a top-level key missing from a row must stay missing
        if late and i % 8 == 3:
            row["meta"] = None  # ... while an explicit null stays null
        if late and i % 9 == 2:
            del row["score"]
        rows.append(row)
    return rows


def test_every_value_round_trips_through_the_schema():
    rows = _drift_rows()
    schema = infer_schema(rows[:256])
    assert str(schema.field("score").type) == "int64"
    import pyarrow as pa

    for r in rows:
        split = split_record(r, schema)
        table = pa.Table.from_pylist([split], schema=record_schema(schema))  # what a shard holds
        back = restore_record(table.to_pylist()[0], schema)
        assert same_value(back, r), (r, back)
        check_record(r, schema)  # never rejects: values that do not fit travel in _extra
    late = rows[289]
    split = split_record(late, schema)
    extra = json.loads(split["_extra"])
    assert split["score"] is None and extra["score"] == 7.5  # not truncated to 7
    assert extra["prompt"][0]["name"] == "alice"  # not dropped
    assert "meta" in extra[MISSING_KEY]
    assert check_record(late, schema) == [k for k in schema.names if k in extra and k != MISSING_KEY]
    # strictness: float vs int, bool vs int, extra/missing dict keys, NaN
    assert not same_value(7, 7.0) and not same_value(True, 1) and not same_value({"a": 1}, {"a": 1, "b": None})
    assert same_value(float("nan"), float("nan")) and same_value([{"a": [1.5]}], [{"a": [1.5]}])


def _selection_restores_missing() -> bool:
    import prefsel.selection as sel

    return re.search(r"\brestore_record\b", inspect.getsource(sel)) is not None


@pytest.mark.usefixtures("ray_local")
def test_drifting_types_score_and_select_field_by_field(tiny_models, tmp_path):
    from prefsel.score_job import ScoreJobConfig, run_score
    from prefsel.selection import SelectConfig, run_select

    rows = _drift_rows()
    data = write_jsonl(tmp_path / "drift.jsonl", rows)
    out = tmp_path / "scores"
    summary = run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                                       output=str(out), chunk_rows=64))
    assert summary["rows_rejected"] == 0, read_rejects(out)[:3]
    assert summary["rows_scored"] == len(rows)
    # the scores shards hold every field exactly (restore_record is their inverse)
    table = read_scores(out)
    for rec in table.to_pylist():
        back = restore_record(rec)
        assert same_value(back, rows[rec["row_id"]]), (rows[rec["row_id"]], back)
    run_select(SelectConfig(scores=str(out), output=str(tmp_path / "sel"), ratio=1.0))
    lines = [json.loads(x) for x in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows)
    by_id = {x["row_id"]: _strip_added(x) for x in lines}
    # values: identical, whatever the drift (7.5 stays 7.5, late message keys are there)
    for i, src in enumerate(rows):
        got = by_id[i]
        for k, v in src.items():
            assert same_value(got.get(k), v), (i, k, v, got.get(k))
    if not _selection_restores_missing():
        pytest.xfail("selection.py must call prepare.restore_record so absent keys stay absent (wiring)")
    for i, src in enumerate(rows):
        assert same_value(by_id[i], src), (i, src, by_id[i])


def test_fields_named_like_score_columns_travel_in_extra():
    import pyarrow as pa

    from prefsel.score_job import scores_schema
    from prefsel.scoring import SCORE_COLUMNS

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "row_id": 7, "gap": 0.5, "chosen_reward": 7.5,
             "prompt_tokens": 3, "_extra": None}]
    schema = infer_schema(rows)
    names = scores_schema(schema).names
    assert len(names) == len(set(names))  # one column per name: the input's own go to _extra
    split = split_record(rows[0], schema)
    assert set(SCORE_COLUMNS).isdisjoint(split) and json.loads(split["_extra"])["chosen_reward"] == 7.5
    table = pa.Table.from_pylist([split], schema=record_schema(schema))
    assert same_value(restore_record(table.to_pylist()[0], schema), rows[0])
    # a scores row: the new scores are its columns, the input's come back from _extra
    scored = {"row_id": 0, **table.to_pylist()[0], **{c: 1.0 for c in SCORE_COLUMNS}}
    assert same_value(restore_record(scored), rows[0])


@pytest.mark.usefixtures("ray_local")
def test_scoring_a_scores_output_again(tiny_models, tmp_path):
    """Input fields named like score columns (here: a scores output scored again) are kept."""
    from prefsel.score_job import ScoreJobConfig, run_score
    from prefsel.selection import SelectConfig, run_select

    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}.",
             "chosen_reward": 7.5 + i, "rejected_reward": 1.0, "gap": -1.0} for i in range(5)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    run = dict(policy=tiny_models[0], reference=tiny_models[1], chunk_rows=2)
    first = run_score(ScoreJobConfig(data=str(data), output=str(tmp_path / "s1"), **run))
    assert first["rows_scored"] == len(rows)
    s1 = read_scores(tmp_path / "s1").to_pylist()
    for rec in s1:  # the input's chosen_reward / gap, not the new scores
        assert same_value(restore_record(rec), rows[rec["row_id"]]), rec
    second = run_score(ScoreJobConfig(data=str(tmp_path / "s1"), output=str(tmp_path / "s2"), **run))
    assert second["rows_scored"] == len(rows) and second["rows_rejected"] == 0
    s2 = read_scores(tmp_path / "s2").to_pylist()
    for old, new in zip(s1, s2):
        assert same_value(restore_record(new), old)  # the whole earlier scores row, exactly
        assert math.isclose(new["gap"], old["gap"], abs_tol=1e-5)  # same models, same pair
    # selection writes the input's format (Parquet here): its rows give the earlier rows back too
    run_select(SelectConfig(scores=str(tmp_path / "s2"), output=str(tmp_path / "sel"), ratio=1.0))
    selected = pq.read_table(tmp_path / "sel" / "selected.parquet").to_pylist()
    assert len(selected) == len(rows)
    for x in selected:
        assert same_value(restore_record(x), s1[x["row_id"]]), x


# --------------------------------------------------------------------------- 2. layouts


def test_implicit_prompt_strings_split_like_trl():
    from trl.data_utils import extract_prompt

    rows = _load("trl_implicit.jsonl")
    assert detect_format(rows) == "conversation"
    for r in rows:
        ex = to_example(r, "conversation")
        want = extract_prompt(dict(r))
        assert (ex.prompt_text, ex.chosen, ex.rejected) == (want["prompt"], want["chosen"], want["rejected"])
        assert ex.prompt_text + ex.chosen == r["chosen"] and ex.prompt_text + ex.rejected == r["rejected"]
        assert not ex.conversational and ex.prompt_messages is None
    # the space before the first difference goes with the responses, as in TRL
    ex = to_example({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "conversation")
    assert (ex.prompt_text, ex.chosen, ex.rejected) == ("The sky is", " blue.", " green.")
    assert implicit_prompt_split("ab", "ab") == -1
    for bad, msg in (({"chosen": "same", "rejected": "same"}, "identical"),
                     ({"chosen": "Q? yes", "rejected": "Q? yes please"}, "prefix"),
                     ({"chosen": "abc", "rejected": "xyz"}, "no prompt")):
        with pytest.raises(RowError, match=msg) as e:
            to_example(bad, "conversation")
        assert "'chosen'" in str(e.value) and "'rejected'" in str(e.value)


@pytest.fixture(scope="module")
def tiny_tok():
    from prefsel.demo_data import demo_corpus_texts
    from prefsel.tiny import build_tiny_tokenizer

    texts = demo_corpus_texts() + [json.dumps(r) for r in _load("uf_h4.jsonl")]
    return build_tiny_tokenizer(texts, chat_template=False)


def test_ultrafeedback_h4_and_trl_layouts_render_the_same_without_template(tiny_tok):
    h4, trl = _load("uf_h4.jsonl"), _load("uf_trl.jsonl")
    assert detect_format(h4) == "pairs" and detect_format(trl) == "conversation"
    pt = PairTokenizer(tiny_tok)
    assert pt.template is None
    for a, b in zip(h4, trl):
        ea, eb = pt.encode(to_example(a, "pairs")), pt.encode(to_example(b, "conversation"))
        assert ea == eb
    first = pt.encode(to_example(h4[0], "pairs"))
    text = tiny_tok.decode(first.prompt_ids + first.chosen_ids)
    assert "Australia?\n\nAssistant: The capital" in text  # not glued: "Australia?The capital"
    assert "Australia?The" not in text


def _sp_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, byte fallback) with a Mistral-like template
    that refuses system turns through jinja's raise_exception."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for r in _load("uf_h4.jsonl"):
        corpus += [r["prompt"], r["chosen"][1]["content"], r["rejected"][1]["content"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                                show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('Conversation roles must be user or assistant') }}{% endif %}{% endfor %}"
    )
    return fast


@pytest.fixture(scope="module")
def sp_tok():
    return _sp_tokenizer()


# --------------------------------------------------------------------------- 3. template errors


def test_template_error_is_a_row_error_naming_the_field(sp_tok):
    pt = PairTokenizer(sp_tok)
    with pytest.raises(RowError, match=r"^field 'prompt': chat template error: Conversation roles must be"):
        pt.encode(to_example({"prompt": [S("Be brief."), U("Q?")], "chosen": "a", "rejected": "b"}, "pairs"))
    conv = {"chosen": [S("Be brief."), U("Q?"), A("a")], "rejected": [S("Be brief."), U("Q?"), A("b")]}
    with pytest.raises(RowError, match=r"^field 'chosen': chat template error"):
        pt.encode(to_example(conv, "conversation"))
    assert pt.encode(to_example({"prompt": [U("Q?")], "chosen": "a", "rejected": "b"}, "pairs")).chosen_ids


@pytest.mark.usefixtures("ray_local")
def test_template_error_rejects_the_row_not_the_job(tiny_models, tmp_path):
    from prefsel.score_job import ScoreJobConfig, run_score

    template = tmp_path / "no_system.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    rows = [{"prompt": [U(f"Q{i}?")], "chosen": [A("yes")], "rejected": [A("no")]} for i in range(6)]
    rows[3] = {"prompt": [S("Be brief."), U("Q3?")], "chosen": [A("yes")], "rejected": [A("no")]}
    out = tmp_path / "out"
    s = run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(write_jsonl(tmp_path / "in.jsonl", rows)),
                                 output=str(out), chat_template=str(template)))
    assert (s["rows_scored"], s["rows_rejected"]) == (5, 1)
    [rej] = read_rejects(out)
    assert rej["row_id"] == 3 and rej["reason"] == "field 'prompt': chat template error: System role not supported"
    assert s["reject_reasons"] == {"field 'prompt': chat template error: System role not supported": 1}


# --------------------------------------------------------------------------- 4. mistyped local paths


@pytest.mark.parametrize("name", ["skywrk.jsonl", "data/skywrk.parquet", "prefs.json", "x.csv", "./prefs",
                                  "../prefs", "~/prefs", "/nowhere/prefs"])
@pytest.mark.parametrize("offline", [True, False])
def test_mistyped_local_path_fails_at_once(monkeypatch, tmp_path, name, offline):
    import prefsel.sources as sources

    monkeypatch.chdir(tmp_path)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_hub(*a, **k):
        raise AssertionError("a local-looking name must not go to the hub")

    monkeypatch.setattr(sources, "_plan_hub", no_hub)
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as e:
        sources.plan_source(name)
    assert time.time() - t0 < 2
    assert str(e.value) == f"--data: {name!r} does not exist" and "\n" not in str(e.value)


def test_hub_like_names_still_go_to_the_hub(monkeypatch, tmp_path):
    import prefsel.sources as sources

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(sources, "_plan_hub", lambda name, split, rows: seen.append(name) or "hub")
    for name in ("Skywork/Skywork-Reward-Preference-80K-v0.2", "trl-lib/ultrafeedback_binarized", "imdb"):
        assert sources.plan_source(name) == "hub"
    assert len(seen) == 3


# --------------------------------------------------------------------------- 5. reasons


def test_reason_kind_keeps_the_whole_cause():
    cases = {
        "field 'chosen': no '\\n\\nAssistant:' turn in HH text": "field 'chosen': no '\\n\\nAssistant:' turn in HH text",
        "field 'chosen': too long: prompt 12 + chosen 130 = 142 tokens > max_length 120":
            "field 'chosen': too long: prompt N + chosen N = N tokens > max_length N",
        "row: invalid JSON: Expecting value: line 1 column 2 (char 1)":
            "row: invalid JSON: Expecting value: line N column N (char N)",
        "field 'chosen[3].role': unknown role 'robot'": "field 'chosen[i].role': unknown role <value>",
        "field 'rewards[1]': expected a finite number, got nan": "field 'rewards[i]': expected a finite number, got <value>",
        "field 'responses[2]': expected a string, got int": "field 'responses[i]': expected a string, got int",
        "field 'prompt': chat template error: System role not supported":
            "field 'prompt': chat template error: System role not supported",
        "fields 'chosen'/'rejected': HH texts differ before the last Assistant turn":
            "fields 'chosen'/'rejected': HH texts differ before the last Assistant turn",
    }
    for reason, kind in cases.items():
        assert reason_kind(reason) == kind
    # rows that differ only in their numbers group together
    assert reason_kind("field 'rejected': too long: prompt 3 + rejected 99 = 102 tokens > max_length 64") == \
        reason_kind("field 'rejected': too long: prompt 50 + rejected 20 = 70 tokens > max_length 64")


def test_all_rejected_error():
    assert all_rejected_error({"rows_in": 10, "rows_scored": 1, "reject_reasons": {"x": 9}}) is None
    msg = all_rejected_error({"rows_in": 10, "rows_scored": 0, "rows_rejected": 10,
                              "reject_reasons": {"field 'chosen': missing": 6, "a": 2, "b": 1, "c": 1}})
    assert msg.startswith("all 10 rows were rejected")
    assert "field 'chosen': missing (6 rows)" in msg and "a (2 rows)" in msg and "1 more reason" in msg
    assert "empty" in all_rejected_error({"rows_in": 0, "rows_scored": 0, "reject_reasons": {}})


# --------------------------------------------------------------------------- 6. tokenization choices


def test_strip_responses_option_against_rendered_text(tiny_tok):
    from prefsel.tiny import TINY_CHAT_TEMPLATE

    tiny_tok.chat_template = TINY_CHAT_TEMPLATE
    try:
        row = {"prompt": [U("Name a colour.")], "chosen": [A("  Blue.\n")], "rejected": [A("Seven. ")]}
        ex = to_example(row, "pairs")
        for strip in (True, False):
            pt = PairTokenizer(tiny_tok, strip_responses=strip)
            enc = pt.encode(ex)
            for resp, ids in zip(ex.responses, enc.response_ids):
                content = resp.strip() if strip else resp
                rendered = tiny_tok.apply_chat_template([*ex.prompt_messages, A(content)], tokenize=False)
                assert tiny_tok.decode(enc.prompt_ids + ids) == rendered
        assert PairTokenizer(tiny_tok).encode(ex) != PairTokenizer(tiny_tok, strip_responses=False).encode(ex)
        # plain-text rows are never stripped: the text is the data
        plain = to_example({"prompt": "Q:", "chosen": " yes ", "rejected": " no"}, "pairs")
        assert PairTokenizer(tiny_tok).encode(plain) == PairTokenizer(tiny_tok, strip_responses=False).encode(plain)
    finally:
        tiny_tok.chat_template = None


def test_sentencepiece_response_has_no_phantom_word_start(sp_tok):
    row = _load("uf_h4.jsonl")[0]
    ex = to_example(row, "pairs")
    pt = PairTokenizer(sp_tok)
    assert pt.dummy_prefix
    enc = pt.encode(ex)
    full = sp_tok.apply_chat_template([*ex.prompt_messages, A(ex.chosen)], tokenize=False)
    assert "[/INST]The capital" in full
    toks = sp_tok.convert_ids_to_tokens(enc.chosen_ids)
    assert not toks[0].startswith("\u2581")  # "[/INST]The": no word start in the text
    # the response ids are exactly those of the rendered text's tail
    full_ids = sp_tok(full, add_special_tokens=False)["input_ids"]
    assert full_ids[-len(enc.chosen_ids):] == enc.chosen_ids
    assert enc.prompt_ids[1:] + enc.chosen_ids == full_ids[1:]  # the whole text, one BOS
    # TRL's way, on purpose: the response tokenized on its own starts a word
    trl_way = PairTokenizer(sp_tok, exact_continuation=False).encode(ex)
    assert sp_tok.convert_ids_to_tokens(trl_way.chosen_ids)[0] == "\u2581The"
    # a response that starts with a space keeps exactly one word start
    plain = PairTokenizer(sp_tok).encode(to_example({"chosen": "Sky is blue", "rejected": "Sky is grey"}, "conversation"))
    assert sp_tok.convert_ids_to_tokens(plain.chosen_ids)[0].startswith("\u2581b")
    assert sp_tok.convert_ids_to_tokens(plain.chosen_ids)[0] != "\u2581"


def test_byte_level_tokenizers_are_unaffected(tiny_tok):
    pt = PairTokenizer(tiny_tok)
    assert not pt.dummy_prefix
    ex = to_example({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, "pairs")
    assert pt.encode(ex) == PairTokenizer(tiny_tok, exact_continuation=False).encode(ex)


def test_rendering_note(tiny_tok, sp_tok):
    with_t, without = PairTokenizer(sp_tok), PairTokenizer(tiny_tok)
    assert "chat template" in rendering_note("hh", with_t)
    assert rendering_note("hh", without) is None  # HH text scored as written
    assert "plain text" in rendering_note("conversation", without)
    assert "plain text" in rendering_note("pairs", without, _load("uf_h4.jsonl")[0])
    assert rendering_note("pairs", without, {"prompt": "Q", "chosen": "a", "rejected": "b"}) is None
    assert "trl.extract_prompt" in rendering_note("conversation", with_t, _load("trl_implicit.jsonl")[0])
    assert rendering_note("conversation", with_t, _load("uf_trl.jsonl")[0]) is None


# --------------------------------------------------------------------------- 7. held-out layouts, end to end


def _score_and_select(tiny_models, tmp_path, data: str, name: str, **kw):
    from prefsel.score_job import ScoreJobConfig, run_score
    from prefsel.selection import SelectConfig, run_select

    out = tmp_path / f"{name}-scores"
    s = run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=data, output=str(out),
                                 chunk_rows=8, **kw))
    run_select(SelectConfig(scores=str(out), output=str(tmp_path / f"{name}-sel"), ratio=1.0))
    sel = tmp_path / f"{name}-sel"
    if (sel / "selected.jsonl").exists():
        selected = [json.loads(x) for x in (sel / "selected.jsonl").read_text().splitlines()]
    else:
        selected = pq.read_table(sel / "selected.parquet").to_pylist()
    return s, read_scores(out), selected


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("name, fmt", [("uf_h4", "pairs"), ("uf_trl", "conversation"),
                                       ("trl_implicit", "conversation"), ("hh", "hh")])
def test_layout_files_score_and_select_field_by_field(tiny_models, tmp_path, name, fmt):
    rows = _load(f"{name}.jsonl")
    s, scores, selected = _score_and_select(tiny_models, tmp_path, str(DATA / f"{name}.jsonl"), name)
    assert s["format"] == fmt and s["rows_rejected"] == 0 and s["rows_scored"] == len(rows) >= 30
    assert len(selected) == len(rows)
    for x in selected:
        assert same_value(_strip_added(x), rows[x["row_id"]]), (x, rows[x["row_id"]])
    assert np.isfinite(scores["gap"].to_numpy()).all()


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("template", ["auto", "none"])
def test_ultrafeedback_layouts_give_the_same_gaps(tiny_models, tmp_path, template):
    _, a, _ = _score_and_select(tiny_models, tmp_path, str(DATA / "uf_h4.jsonl"), "h4", chat_template=template)
    _, b, _ = _score_and_select(tiny_models, tmp_path, str(DATA / "uf_trl.jsonl"), "trl", chat_template=template)
    for col in ("prompt_tokens", "chosen_tokens", "rejected_tokens"):
        assert a[col].to_pylist() == b[col].to_pylist()
    # The same token ids; which rows share a forward depends on how Ray Data bundles blocks into
    # actor calls (timing), and a float32 forward's last digits on the row width: hence 1e-6, not 0
    # (seen: 1.4e-7 under load). The batch-composition invariance tests bound it at 1e-5.
    np.testing.assert_allclose(a["gap"].to_numpy(), b["gap"].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.usefixtures("ray_local")
def test_datasetdict_folder_with_split(tiny_models, tmp_path):
    import datasets

    from prefsel.sources import plan_source

    rows = _load("uf_h4.jsonl")
    folder = tmp_path / "ultrafeedback"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows[:18]),
                          "test_prefs": datasets.Dataset.from_list(rows[18:])}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"splits \['train_prefs', 'test_prefs'\]; choose one with --split"):
        plan_source(str(folder))
    assert plan_source(str(folder), split="test_prefs").num_rows == len(rows) - 18
    s, _, selected = _score_and_select(tiny_models, tmp_path, str(folder), "dd", split="test_prefs")
    assert s["source_kind"] == "hf_disk" and s["rows_scored"] == len(rows) - 18 and s["rows_rejected"] == 0
    for x in selected:
        assert same_value(_strip_added(x), rows[18 + x["row_id"]]), x
    assert math.isclose(sum(x["score_chosen"] for x in selected), sum(r["score_chosen"] for r in rows[18:]))
