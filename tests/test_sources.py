"""Planning the input (prefsel.sources): globs, JSON files in every shape they come in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from helpers import write_jsonl
from prefsel.sources import MAX_JSON_DEPTH, plan_source, read_chunk

ROW = {"prompt": "p", "chosen": "c", "rejected": "r"}


def _rows(plan) -> list:
    return [r for c in plan.chunks for r in read_chunk(c)]


# --------------------------------------------------------------------------- globs


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """a.jsonl, b.jsonl, .hidden.jsonl, _tmp.jsonl, old/c.jsonl, old/new/d.jsonl, .git/e.jsonl, _x/f.jsonl."""
    for rel in ("a.jsonl", "b.jsonl", ".hidden.jsonl", "_tmp.jsonl", "old/c.jsonl", "old/new/d.jsonl",
                ".git/e.jsonl", "_x/f.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / rel, [ROW])
    return tmp_path


def _names(plan, root: Path) -> list[str]:
    return [str(Path(f).relative_to(root)) for f in plan.files]


def test_glob_star_stays_in_its_folder_and_skips_hidden(tree):
    # the shell's `*`: no '/', no leading '.'; and `_` files, as the folder listing skips them
    assert _names(plan_source(f"{tree}/*.jsonl"), tree) == ["a.jsonl", "b.jsonl"]
    assert _names(plan_source(f"{tree}/*/*.jsonl"), tree) == ["old/c.jsonl"]
    assert _names(plan_source(f"{tree}/?.jsonl"), tree) == ["a.jsonl", "b.jsonl"]


def test_glob_double_star_crosses_folders_but_not_hidden_ones(tree):
    assert _names(plan_source(f"{tree}/**/*.jsonl"), tree) == ["a.jsonl", "b.jsonl", "old/c.jsonl", "old/new/d.jsonl"]
    assert _names(plan_source(f"{tree}/old/**"), tree) == ["old/c.jsonl", "old/new/d.jsonl"]


def test_glob_names_hidden_files_only_when_asked(tree):
    assert _names(plan_source(f"{tree}/.*.jsonl"), tree) == [".hidden.jsonl"]
    assert _names(plan_source(f"{tree}/_x/*.jsonl"), tree) == ["_x/f.jsonl"]  # a literal folder
    with pytest.raises(FileNotFoundError, match="no files match"):
        plan_source(f"{tree}/nothere/*.jsonl")


def test_glob_is_segment_wise_on_any_pyarrow_filesystem(tree):
    from prefsel.sources import _glob_files

    # object stores list 'bucket/key' paths: the same code, no leading '/'
    sub = pafs.SubTreeFileSystem(str(tree), pafs.LocalFileSystem())
    assert _glob_files(sub, "old/*.jsonl") == ["old/c.jsonl"]
    assert _glob_files(sub, "old/**/*.jsonl") == ["old/c.jsonl", "old/new/d.jsonl"]


# --------------------------------------------------------------------------- JSON files


def test_column_oriented_json_with_ragged_columns_is_refused(tmp_path):
    p = tmp_path / "cols.json"
    p.write_text(json.dumps({"prompt": ["p1", "p2"], "chosen": ["c1", "c2", "c3"], "rejected": ["r1", "r2", "r3"]}))
    with pytest.raises(ValueError, match=r"cols\.json: column-oriented JSON with columns of different lengths "
                                         r"\('prompt' 2, 'chosen' 3, 'rejected' 3\)"):
        plan_source(str(p))
    p.write_text(json.dumps({"prompt": ["p1", "p2"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"]}))
    assert [r.record["chosen"] for r in _rows(plan_source(str(p)))] == ["c1", "c2"]


def test_too_deep_json_array_element_is_a_reject_like_a_json_line(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    bad = '{"prompt": "p", "chosen": "c", "rejected": "r", "x": ' + deep + "}"
    good = json.dumps(ROW)
    (tmp_path / "deep.json").write_text(f"[{good}, {bad},\n {good}]")
    (tmp_path / "deep.jsonl").write_text(f"{good}\n{bad}\n{good}\n")
    for chunk_rows in (1, 2, 10):
        rows = _rows(plan_source(str(tmp_path / "deep.json"), chunk_rows))
        lines = _rows(plan_source(str(tmp_path / "deep.jsonl"), chunk_rows))
        assert [(r.row_id, r.record, r.error) for r in rows] == [(r.row_id, r.record, r.error) for r in lines]
        assert rows[1].error == f"row: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        assert rows[1].raw == bad  # kept in rejects/ as it was written
    (tmp_path / "deep_cols.json").write_text('{"prompt": [' + deep + "]}")
    with pytest.raises(ValueError, match=r"deep_cols\.json: JSON nested too deeply"):
        plan_source(str(tmp_path / "deep_cols.json"))


def test_json_lines_under_a_json_name_are_read_as_json_lines(tmp_path):
    rows = [dict(ROW, prompt=f"p{i}") for i in range(5)]
    p = write_jsonl(tmp_path / "train.json", rows)  # what datasets' Dataset.to_json writes
    plan = plan_source(str(p), chunk_rows=2)
    assert plan.num_rows == 5 and [r.record for r in _rows(plan)] == rows
    # a bad line is that row's reject, as in any JSON lines file
    write_jsonl(tmp_path / "bad.json", [rows[0], "{not json", rows[1]])
    assert [r.error is None for r in _rows(plan_source(str(tmp_path / "bad.json")))] == [True, False, True]
    # a broken FIRST line too: the second line says JSON lines (a pretty-printed object's never does)
    for first in ("{not json", "not json", '{"prompt": "p", "chosen": "c",'):
        for rest in ([rows[1]], [rows[1], rows[2]]):
            write_jsonl(tmp_path / "bad_first.json", [first, *rest])
            got = _rows(plan_source(str(tmp_path / "bad_first.json"), chunk_rows=2))
            assert [r.record for r in got[1:]] == rest and got[0].error is not None, (first, got)


def test_json_that_is_neither_one_value_nor_json_lines_names_the_file(tmp_path):
    p = tmp_path / "two.json"
    p.write_text('{"prompt": "p",\n "chosen": "c", "rejected": "r"}\n{"prompt": "q"}\n')  # pretty-printed, twice
    with pytest.raises(ValueError, match=r"two\.json is not valid JSON: Extra data.*name the file \.jsonl"):
        plan_source(str(p))
    p.write_text(json.dumps(ROW, indent=1))  # one pretty-printed object, not a list of rows
    with pytest.raises(ValueError, match=r"two\.json must hold a JSON array of objects.*\.jsonl"):
        plan_source(str(p))


def test_json_edge_files_lose_no_row_and_crash_nothing(tmp_path):
    """An empty .json is no rows (as an empty .jsonl); one object on one line is a JSON lines
    file of one row (datasets' to_json of one row); data after an array's `]` is refused, not
    dropped; an element the decoder refuses (an integer of over 4300 digits) is that row's
    reject; invalid UTF-8 in an array (decoded whole) names the file and the byte."""
    (tmp_path / "empty.json").write_text(" \n")
    assert plan_source(str(tmp_path / "empty.json")).num_rows == 0
    for text in (json.dumps(ROW), json.dumps(ROW) + "\n"):
        (tmp_path / "one.json").write_text(text)
        assert [r.record for r in _rows(plan_source(str(tmp_path / "one.json")))] == [ROW]
    for name, text in [("two_arrays.json", f"[{json.dumps(ROW)}]\n[{json.dumps(ROW)}]"),
                       ("then_lines.json", f"[{json.dumps(ROW)}]\n{json.dumps(ROW)}\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name} is not valid JSON: extra data after the array"):
            plan_source(str(tmp_path / name))
    big = json.dumps(ROW)[:-1] + ', "n": ' + "9" * 5000 + "}"
    (tmp_path / "big.json").write_text(f"[{json.dumps(ROW)}, {big}, {json.dumps(ROW)}]")
    for chunk_rows in (1, 2, 10):
        rows = _rows(plan_source(str(tmp_path / "big.json"), chunk_rows=chunk_rows))
        assert [r.row_id for r in rows] == [0, 1, 2] and [r.record for r in rows[::2]] == [ROW, ROW]
        assert rows[1].record is None and rows[1].error.startswith("row: invalid JSON: Exceeds the limit")
    # a syntax error inside the array: where the next element starts is unknown, so nothing is
    # read, and the error names the element (a JSON lines file would reject that line only)
    (tmp_path / "broken.json").write_text(f"[{json.dumps(ROW)},\n {json.dumps(ROW)},\n {{\"prompt\": }},\n {json.dumps(ROW)}]")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON: element 2 of the array .*Expecting "
                                         r"value: line 3 .*nothing was read.*\.jsonl"):
        plan_source(str(tmp_path / "broken.json"))
    (tmp_path / "utf8.json").write_bytes(b'[{"prompt": "\xff"}]')
    with pytest.raises(ValueError, match=r"utf8\.json: invalid UTF-8 at byte 13"):
        plan_source(str(tmp_path / "utf8.json"))


def test_a_path_with_glob_characters_that_exists_is_read_as_it_is(tmp_path):
    folder = tmp_path / "run[1]"
    folder.mkdir()
    p = write_jsonl(folder / "in.jsonl", [ROW, ROW])
    assert plan_source(str(p)).num_rows == 2 and plan_source(str(folder)).num_rows == 2
    with pytest.raises(FileNotFoundError, match="no files match"):  # absent: a pattern, matching nothing
        plan_source(str(tmp_path / "run[2]" / "in.jsonl"))


def test_duplicate_parquet_column_names_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.Table.from_arrays([pa.array(["p"]), pa.array(["c"]), pa.array(["r"]), pa.array(["x1"]), pa.array(["x2"])],
                             names=["prompt", "chosen", "rejected", "note", "note"])
    pq.write_table(t, tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match=r"dup\.parquet: duplicate column name 'note'"):
        plan_source(str(tmp_path / "dup.parquet"))
