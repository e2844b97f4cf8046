"""One bad row never aborts a job (issue 16, items 4-6): every per-row failure is a reject with
its reason, over-long rows are rejected against the model's context, input text stays what it
was (invalid UTF-8 is rejected, not replaced; a BOM is accepted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefsel.formats import RowError, to_example
from prefsel.prepare import dumps, prepare_rows, record_schema
from prefsel.sources import MAX_JSON_DEPTH, RawRow, plan_source, read_chunk, sample_records, value_problem

GOOD = {"prompt": "What is 2+2?", "chosen": "four", "rejected": "five"}
SURROGATE_LINE = b'{"prompt": "Q?", "chosen": "a\\ud800b", "rejected": "no"}'
SURROGATE_REASON = "field 'chosen': lone surrogate \\ud800 (not valid Unicode)"
DEEP = 100_000
DEEP_LINE = b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b', "chosen": "a", "rejected": "b"}'
DEEP_REASON = "row: JSON nested too deeply"
BAD_UTF8_LINE = b'{"prompt": "Q?", "chosen": "a\xffb", "rejected": "no"}'
BAD_UTF8_REASON = f"row: invalid UTF-8 at byte {BAD_UTF8_LINE.index(0xFF)} of the line"  # byte 28
BIG = 2**70
BIG_REASON = f"field 'x': integer {BIG} is out of the 64-bit range"


def _write(path: Path, lines: list[bytes], bom: bool = False) -> str:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n")
    return str(path)


def _rows(path: str, chunk_rows: int = 1024) -> list[RawRow]:
    return [r for c in plan_source(path, chunk_rows).chunks for r in read_chunk(c)]


def _good_line(i: int = 0, **extra) -> bytes:
    return json.dumps({**GOOD, "prompt": f"What is {i}+{i}?", **extra}).encode()


@pytest.fixture(scope="module")
def pair_tok(tiny_models):
    from prefsel.models import load_tokenizer
    from prefsel.tokenization import PairTokenizer

    return PairTokenizer(load_tokenizer(tiny_models[0]))


# ---- 16.4: one bad row never aborts the job ------------------------------------------------------


def test_lone_surrogate_is_a_reject_naming_the_field(tmp_path):
    path = _write(tmp_path / "s.jsonl", [_good_line(0), SURROGATE_LINE, _good_line(1)])
    rows = _rows(path)
    assert [r.error for r in rows] == [None, SURROGATE_REASON, None]
    bad = rows[1]
    assert bad.record is None and bad.raw == SURROGATE_LINE.decode()  # the line, as written
    bad.raw.encode("utf-8")  # valid Unicode
    # the sample for format detection / schema inference skips it (it used to crash there)
    assert [r["prompt"] for r in sample_records(plan_source(path))] == ["What is 0+0?", "What is 1+1?"]


def test_deeply_nested_json_is_a_reject(tmp_path):
    just_too_deep = json.dumps({**GOOD, "meta": json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)})
    path = _write(tmp_path / "d.jsonl", [DEEP_LINE, b"[" * DEEP + b"]" * DEEP, just_too_deep.encode(), _good_line()])
    rows = _rows(path)
    assert rows[0].error.startswith(DEEP_REASON) and rows[1].error.startswith(DEEP_REASON)
    assert rows[2].error == f"field 'meta': JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)"
    assert rows[3].error is None
    assert len(sample_records(plan_source(path))) == 1
    # a rerun reads the same way (it used to crash again)
    assert [r.error for r in _rows(path)] == [r.error for r in rows]


def test_prepare_rows_turns_any_exception_into_that_rows_reject(pair_tok):
    class Flaky:  # a tokenizer that fails unexpectedly on one row
        def encode(self, ex):
            if ex.chosen == "boom":
                raise KeyError("surprise")
            return pair_tok.encode(ex)

    deep = {**GOOD, "chosen": json.loads("[" * 150 + "]" * 150)}
    rows = [
        RawRow(0, dict(GOOD)),
        RawRow(1, {**GOOD, "chosen": "boom"}),
        RawRow(2, {**GOOD, "chosen": "a\ud800b"}),  # e.g. from a JSON array file
        RawRow(3, deep),
        RawRow(4, None),  # a null element of a JSON array
        RawRow(5, [1, 2]),
        RawRow(6, None, raw="{nope", error="row: invalid JSON: Expecting property name"),
        RawRow(7, dict(GOOD)),
    ]
    out = prepare_rows(rows, "pairs", Flaky())
    reasons = [p.reason for p in out]
    assert reasons[0] is None and reasons[7] is None
    assert reasons[1] == "row: KeyError: 'surprise'"
    assert reasons[2] == SURROGATE_REASON
    assert reasons[3] == f"field 'chosen': JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)"
    assert reasons[4] == "row: is null, expected a JSON object"
    assert reasons[5] == "row: is a JSON array, expected an object"
    assert reasons[6].startswith("row: invalid JSON")
    for p in out:  # every record is valid JSON text in valid Unicode
        p.record.encode("utf-8")
        json.loads(p.record)
    assert json.loads(out[2].record)["chosen"] == "a\\ud800b"  # kept, escaped
    assert json.loads(out[6].record) == "{nope"  # the raw line


def test_dumps_and_rejects_file_hold_a_lone_surrogate(tmp_path):
    import pyarrow as pa

    from prefsel.run_output import RunOutput

    rec = {"chosen": "a\ud800b", "ok": "é"}
    text = dumps(rec)
    text.encode("utf-8")
    assert json.loads(text) == {"chosen": "a\\ud800b", "ok": "é"}
    # the reject the writer gets back from the record text: written without error
    out = RunOutput(str(tmp_path / "o"), {"t": 1}, kind="scores")
    reject = {"row_id": 0, "reason": SURROGATE_REASON, "record": json.loads(text)}
    out.write_chunk(0, pa.table({"row_id": pa.array([], pa.int64())}), [reject])
    line = (tmp_path / "o.partial" / "rejects" / "part-000000.jsonl").read_text(encoding="utf-8")
    assert json.loads(line) == reject


def test_generate_and_annotate_prepare_never_raise_for_a_row(pair_tok):
    from prefsel.generation.annotate_job import prepare_multi_rows as annotate_rows
    from prefsel.generation.generate_job import prepare_prompts

    multi = {"prompt": "Q?", "responses": ["a", "b"]}
    rows = [RawRow(0, dict(multi)), RawRow(1, {**multi, "prompt": "x\ud800"}), RawRow(2, None, raw="[[", error="row: JSON nested too deeply"),
            RawRow(3, {"prompt": "Q?", "responses": ["a", {"deep": json.loads("[" * 150 + "]" * 150)}]})]
    for out in (prepare_prompts(rows, pair_tok, None), annotate_rows(rows, pair_tok)):
        reasons = [o["reason"] for o in out]
        assert reasons[0] is None
        assert reasons[1] == "field 'prompt': lone surrogate \\ud800 (not valid Unicode)"
        assert reasons[2] == "row: JSON nested too deeply"
        assert reasons[3].startswith("field 'responses': JSON nested too deeply")
        for o in out:
            json.loads(o["record"])
            o["record"].encode("utf-8")

    class Broken:
        def encode(self, ex):
            raise IndexError("bug")

        def encode_prompt(self, ex):
            raise IndexError("bug")

    assert prepare_prompts(rows[:1], Broken(), None)[0]["reason"] == "row: IndexError: bug"
    # hf backend: a prompt whose max_tokens new tokens could pass the model's positions is a reject
    n = len(prepare_prompts(rows[:1], pair_tok, None)[0]["prompt_ids"])
    assert prepare_prompts(rows[:1], pair_tok, None, positions=n + 8, max_tokens=8)[0]["reason"] is None
    assert prepare_prompts(rows[:1], pair_tok, None, positions=n + 7, max_tokens=8)[0]["reason"] == \
        f"field 'prompt': too long: {n} tokens + max_tokens 8 > the model's {n + 7} positions"
    assert annotate_rows(rows[:1], Broken())[0]["reason"] == "row: IndexError: bug"
    # a row's own row_id beyond the outputs' int64 column: that row's reject (it aborted the job)
    big = [RawRow(0, {**multi, "row_id": 2**70}), RawRow(1, {**multi, "row_id": 7})]
    for out in (prepare_prompts(big, pair_tok, None), annotate_rows(big, pair_tok)):
        assert out[0]["reason"] == f"field 'row_id': {2**70} is outside the 64-bit integers an output row_id holds"
        assert out[0]["out_id"] == 0 and out[1]["reason"] is None and out[1]["out_id"] == 7


# ---- 16.5: too long for the model is rejected by default ----------------------------------------------


def test_model_context_length_and_over_long_row_rejected(tiny_models, tmp_path):
    from transformers import LlamaConfig

    from prefsel.models import load_tokenizer, model_context_length
    from prefsel.tiny import build_tiny_pair
    from prefsel.tokenization import PairTokenizer

    tok = load_tokenizer(tiny_models[0])
    assert tok.model_max_length > 10**20  # transformers' "unset" sentinel: ignored
    policy, reference = build_tiny_pair(tmp_path / "m64", tokenizer=tok, max_position_embeddings=64)
    assert model_context_length(tok, policy) == 64
    assert model_context_length(tok, [policy, reference]) == 64
    assert model_context_length(tok, [tiny_models[0], policy]) == 64  # a pair: the smaller
    assert model_context_length(None, LlamaConfig(max_position_embeddings=128)) == 128
    tok32 = load_tokenizer(tiny_models[0])
    tok32.model_max_length = 32
    assert model_context_length(tok32, policy) == 32  # the tokenizer's own limit when smaller
    assert model_context_length(tok, []) is None

    row = {"prompt": "Count:", "chosen": " ".join(["yes"] * 100), "rejected": "no"}
    ex = to_example(row, "pairs")
    assert len(PairTokenizer(tok).encode(ex).chosen_ids) >= 100  # would have been scored silently
    limited = PairTokenizer(tok, max_length=model_context_length(tok, [policy, reference]), truncation="reject")
    with pytest.raises(RowError, match=r"field 'chosen': too long: .* > max_length 64"):
        limited.encode(ex)
    out = prepare_rows([RawRow(0, row), RawRow(1, dict(GOOD))], "pairs", limited)
    assert out[0].reason.startswith("field 'chosen': too long") and out[1].reason is None


def test_an_explicit_max_length_is_checked_against_the_models_positions(tiny_models, tmp_path):
    """resolve_max_length: unset is the models' context; set, it is taken up to the smallest
    config's positions and refused above them, naming the config that sets the limit. The
    tokenizer's model_max_length (often mis-set) is no limit for an explicit value."""
    from transformers import LlamaConfig

    from prefsel.models import check_max_length, load_tokenizer, resolve_max_length
    from prefsel.tiny import build_tiny_pair

    tok = load_tokenizer(tiny_models[0])
    short, _ = build_tiny_pair(tmp_path / "m64", tokenizer=tok, max_position_embeddings=64)
    assert resolve_max_length(None, tok, list(tiny_models)) == 1024
    assert resolve_max_length(1024, tok, list(tiny_models)) == 1024
    with pytest.raises(ValueError, match=rf"^max_length: 65 exceeds the models' 64 positions "
                                         rf"\(max_position_embeddings of {short}'s config\); give at most 64$"):
        resolve_max_length(65, tok, [tiny_models[0], short])  # the pair's smaller model is the limit
    tok.model_max_length = 32
    assert resolve_max_length(512, tok, list(tiny_models)) == 512
    with pytest.raises(ValueError, match=r"^max_prompt_length: 2000 exceeds .* 128 positions \(max_position_embeddings"):
        check_max_length(2000, LlamaConfig(max_position_embeddings=128), field="max_prompt_length")
    check_max_length(10**6, [])  # positions unknown: nothing to refuse


# ---- 16.6: input text stays what it was ----------------------------------------------------------------


def test_invalid_utf8_is_rejected_with_its_byte_offset(tmp_path):
    path = _write(tmp_path / "u.jsonl", [_good_line(), BAD_UTF8_LINE])
    rows = _rows(path)
    assert rows[0].error is None
    assert rows[1].error == BAD_UTF8_REASON
    assert rows[1].record is None and "\\xff" in rows[1].raw and "\ufffd" not in rows[1].raw


def test_bom_at_file_start_is_accepted(tmp_path):
    path = _write(tmp_path / "b.jsonl", [_good_line(0), _good_line(1), _good_line(2)], bom=True)
    for chunk_rows in (1, 2, 1024):
        rows = _rows(path, chunk_rows)
        assert [r.error for r in rows] == [None] * 3
        assert rows[0].record["prompt"] == "What is 0+0?"
    # only the file's first line may carry one
    path = _write(tmp_path / "b2.jsonl", [_good_line(0), b"\xef\xbb\xbf" + _good_line(1)])
    assert _rows(path)[1].error.startswith("row: invalid JSON")


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"null", "row: is null, expected a JSON object"),
        (b"[1, 2]", "row: is a JSON array, expected an object"),
        (b"3.5", "row: is a JSON number, expected an object"),
        (b'"text"', "row: is a JSON string, expected an object"),
        (b"true", "row: is a JSON boolean, expected an object"),
    ],
)
def test_a_line_that_is_not_an_object(tmp_path, line, reason, pair_tok):
    rows = _rows(_write(tmp_path / "n.jsonl", [_good_line(), line]))
    assert rows[1].record is None and rows[1].error == reason and rows[1].raw == line.decode()
    p = prepare_rows(rows, "pairs", pair_tok)[1]
    assert p.reason == reason and json.loads(p.record) == line.decode()  # the line is kept


def test_empty_file_says_it_is_empty(tmp_path):
    for name, content in (("e.jsonl", b""), ("blank.jsonl", b"\n  \n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"--data: .*{name} is empty"):
            sample_records(plan_source(str(tmp_path / name)))


def test_integer_beyond_64_bits(pair_tok):
    import pyarrow as pa

    assert value_problem({"x": BIG}, int64_fields={"x"}) == BIG_REASON
    assert value_problem({"x": BIG}) is None  # only where a 64-bit column must hold it
    assert value_problem({"x": [1, -BIG]}, int64_fields=True) == f"field 'x[1]': integer {-BIG} is out of the 64-bit range"
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()), ("x", pa.int64())])
    rows = [RawRow(0, {**GOOD, "x": 1}), RawRow(1, {**GOOD, "x": BIG})]
    # kept exactly: the int64 column holds 1; BIG, which it cannot hold, travels in _extra
    out = prepare_rows(rows, "pairs", pair_tok, schema)
    assert [p.reason for p in out] == [None, None]
    assert out[0].fields["x"] == 1 and out[0].fields["_extra"] is None
    assert out[1].fields["x"] is None and json.loads(out[1].fields["_extra"]) == {"x": BIG}
    assert json.loads(out[1].record)["x"] == BIG
    assert pa.Table.from_pylist([p.fields for p in out], schema=record_schema(schema)).num_rows == 2
    # the sample for schema inference skips it, so `x` stays an int64 column
    assert value_problem({**GOOD, "x": BIG}, int64_fields=True) == BIG_REASON


# ---- end to end --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_local")
def test_score_job_with_every_kind_of_bad_row(tiny_models, tmp_path):
    from helpers import read_rejects, read_scores

    from prefsel.models import load_tokenizer, model_context_length
    from prefsel.score_job import ScoreJobConfig, run_score

    long_row = {**GOOD, "chosen": " ".join(["yes"] * 1100)}
    lines = [_good_line(i, x=i) for i in range(6)]
    bad = {  # position in the file -> (line, expected reason prefix)
        1: (SURROGATE_LINE, SURROGATE_REASON),
        3: (DEEP_LINE, DEEP_REASON),
        4: (BAD_UTF8_LINE, BAD_UTF8_REASON),
        6: (b"null", "row: is null, expected a JSON object"),
        7: (b"[1, 2]", "row: is a JSON array, expected an object"),
        9: (b"42", "row: is a JSON number, expected an object"),
        10: (json.dumps(long_row).encode(), "field 'chosen': too long"),
        12: (b'"just text"', "row: is a JSON string, expected an object"),
    }
    for pos in sorted(bad):
        lines.insert(pos, bad[pos][0])
    big_pos = len(lines)
    lines.append(_good_line(99, x=BIG))
    lines.append(_good_line(100, x=7))
    data = _write(tmp_path / "in.jsonl", lines, bom=True)  # row 0 starts with a BOM and is good

    tok = load_tokenizer(tiny_models[0])
    max_length = model_context_length(tok, list(tiny_models))
    assert max_length == 1024
    out = tmp_path / "out"
    summary = run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=data, output=str(out),
                                       chunk_rows=4, max_length=max_length))
    assert summary["rows_in"] == len(lines) == summary["rows_scored"] + summary["rows_rejected"]
    rejects = {r["row_id"]: r for r in read_rejects(out)}
    for pos, (_, reason) in bad.items():
        assert pos in rejects, (pos, reason)
        assert rejects[pos]["reason"].startswith(reason), (pos, rejects[pos]["reason"])
    assert rejects[1]["record"] == SURROGATE_LINE.decode()  # kept as it was written
    assert rejects[6]["record"] == "null"
    # the 2**70 row: kept exactly, or rejected saying why (never "does not match int64")
    assert set(rejects) - set(bad) <= {big_pos}
    if big_pos in rejects:
        assert rejects[big_pos]["reason"] == BIG_REASON
    scored = read_scores(out)["row_id"].to_pylist()
    expected = [i for i in range(len(lines)) if i not in rejects]
    assert scored == expected and 0 in scored  # the BOM row is scored
    assert summary["rows_scored"] == len(expected)


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085"])
def test_rejects_and_jsonl_shards_with_unicode_line_separators_are_read_back(tmp_path, sep):
    """dumps writes U+2028, U+2029 and U+0085 raw inside JSON strings (ASCII controls are escaped),
    and str.splitlines() splits at them; the rejects and JSON-lines shards are read back split on
    "\\n" only, so the run's summary counts the row instead of dying (on every resume too)."""
    import pyarrow as pa

    from prefsel.generation.output import JsonlRunOutput, read_rejects
    from prefsel.run_output import RunOutput
    from prefsel.summary import count_output

    reject = {"row_id": 1, "reason": "field 'rejected': missing", "record": {"chosen": f"line one{sep}line two"}}
    assert sep in dumps(reject)  # written raw, not escaped
    out = RunOutput(str(tmp_path / "o"), {"t": 1}, kind="scores")
    empty = pa.table({c: pa.array([], pa.int64()) for c in ("row_id", "prompt_tokens", "chosen_tokens", "rejected_tokens")})
    out.write_chunk(0, empty, [reject, {**reject, "row_id": 2}])
    counted = count_output(out.fs, out.dir)
    assert counted["rows_rejected"] == 2 and dict(counted["reasons"]) == {reject["reason"]: 2}

    row = {"row_id": 0, "prompt": f"a{sep}b", "responses": [f"c{sep}d", "e"]}
    jl = JsonlRunOutput(str(tmp_path / "g"), {"t": 1}, kind="generations")
    jl.write_rows(0, [row], [reject])
    assert jl.count() == {"rows_out": 1, "responses": 2, "rows_rejected": 1, "reject_reasons": {reject["reason"]: 1}}
    jl.finalize({})
    assert read_rejects(str(tmp_path / "g")) == [reject]
