"""A resumed run never mixes inputs: the fingerprint stamps every input file, and a rerun after
an edit is refused with the file named (locally here; on S3 in tests/test_object_storage.py)."""

from __future__ import annotations

import os

import pytest

from helpers import read_scores, write_jsonl
from prefsel.demo_data import make_demo_pairs
from prefsel.run_output import RunOutput
from prefsel.score_job import ScoreJobConfig, fingerprint, run_score
from prefsel.sources import plan_source


def _unfinished(cfg: ScoreJobConfig) -> None:
    """The state a killed run leaves: an output folder whose manifest holds the run's fingerprint."""
    RunOutput(cfg.output, fingerprint(cfg, plan_source(cfg.data, cfg.chunk_rows).files, "pairs"), kind="scores")


def test_edited_input_is_refused_and_named(ray_local, tiny_models, tmp_path):
    rows = make_demo_pairs(12, seed=1)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                         output=str(tmp_path / "out"), chunk_rows=4, max_length=512)
    _unfinished(cfg)
    write_jsonl(data, rows[::-1] + rows[:2])  # edited between the kill and the rerun
    with pytest.raises(FileExistsError, match=r"input file changed since the unfinished run: .*in\.jsonl"):
        run_score(cfg)
    # the same input again resumes into the same output
    cfg2 = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                          output=str(tmp_path / "out2"), chunk_rows=4, max_length=512)
    _unfinished(cfg2)
    s = run_score(cfg2)
    assert s["rows_scored"] == len(rows) + 2
    assert read_scores(tmp_path / "out2")["row_id"].to_pylist() == list(range(len(rows) + 2))


def test_same_size_same_mtime_edit_needs_hash_inputs(tiny_models, tmp_path):
    """Size + mtime miss an edit that keeps both; --hash-inputs (content SHA-256) catches it."""
    rows = make_demo_pairs(8, seed=2)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    st = os.stat(data)
    swapped = data.read_text().replace("Answer", "Answxr", 1)
    assert len(swapped) == len(data.read_text())
    common = dict(policy=tiny_models[0], reference=tiny_models[1], data=str(data), chunk_rows=4)
    by_stamp = ScoreJobConfig(output=str(tmp_path / "a"), **common)
    by_hash = ScoreJobConfig(output=str(tmp_path / "b"), hash_inputs=True, **common)
    fp_stamp = fingerprint(by_stamp, [str(data)], "pairs")
    fp_hash = fingerprint(by_hash, [str(data)], "pairs")
    data.write_text(swapped)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(by_stamp, [str(data)], "pairs") == fp_stamp  # the documented limit of stamps
    assert fingerprint(by_hash, [str(data)], "pairs") != fp_hash


def test_chunk_ids_of_a_million_and_more_are_read_whole(tmp_path):
    """Shards are named part-{chunk_id:06d}: from chunk 10**6 on the name has seven digits, and
    resume must read all of them (a six-digit slice reads part-1000005 as chunk 100000, so chunk
    100000 would be skipped as done and chunk 1000005 scored again)."""
    import pyarrow as pa

    out = RunOutput(str(tmp_path / "s"), {"t": 1}, kind="scores")
    for chunk in (5, 999_999, 1_000_005, 12_345_678):
        out.write_chunk(chunk, pa.table({"row_id": pa.array([chunk], pa.int64())}), [])
    assert out.done_chunks() == {5, 999_999, 1_000_005, 12_345_678}
    from prefsel.generation.output import JsonlRunOutput
    from prefsel.run_output import shard_chunk_id

    jl = JsonlRunOutput(str(tmp_path / "g"), {"t": 1}, kind="generations")
    jl.write_rows(1_000_005, [{"row_id": 0}], [])
    assert jl.done_chunks() == {1_000_005}
    # only whole shard names: temporary files and others are not chunks
    assert shard_chunk_id("part-000007.parquet.tmp-1a2b3c4d", ".parquet") is None
    assert shard_chunk_id("part-.parquet", ".parquet") is None
    assert shard_chunk_id("part-00x007.parquet", ".parquet") is None


def test_chat_template_file_is_stamped_by_content(tiny_models, tmp_path):
    """--chat-template FILE: an edit of the file (same path) between runs changes the fingerprint."""
    data = write_jsonl(tmp_path / "in.jsonl", make_demo_pairs(4, seed=3))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                         output=str(tmp_path / "o"), chat_template=str(template))
    before = fingerprint(cfg, [str(data)], "pairs")
    assert fingerprint(cfg, [str(data)], "pairs") == before  # the same file: resume
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}")
    assert fingerprint(cfg, [str(data)], "pairs") != before


@pytest.mark.parametrize("name", ["merges.txt", "vocab.txt", "qwen.tiktoken", "modeling_custom.py"])
def test_model_stamp_covers_every_tokenizer_file(tmp_path, name):
    """BPE merges, WordPiece vocabularies and tiktoken files decide the token ids too, and the
    remote code that --trust-remote-code runs decides the forward."""
    from prefsel.jobs import model_stamp

    (tmp_path / "config.json").write_text("{}")
    f = tmp_path / name
    f.write_text("a b\n")
    before = model_stamp(str(tmp_path))
    f.write_text("a b\nc d\n")
    assert model_stamp(str(tmp_path)) != before


def test_switching_hash_inputs_is_named_not_an_input_change(tiny_models, tmp_path):
    """A rerun that adds or drops --hash-inputs is refused for that reason, not for a "changed" file."""
    data = write_jsonl(tmp_path / "in.jsonl", make_demo_pairs(4, seed=4))
    common = dict(policy=tiny_models[0], reference=tiny_models[1], data=str(data), output=str(tmp_path / "o"))
    for first, second, was in ((False, True, "off"), (True, False, "on")):
        RunOutput(common["output"], fingerprint(ScoreJobConfig(**common, hash_inputs=first), [str(data)], "pairs"),
                  kind="scores", overwrite=True)
        new = fingerprint(ScoreJobConfig(**common, hash_inputs=second), [str(data)], "pairs")
        with pytest.raises(FileExistsError) as e:
            RunOutput(common["output"], new, kind="scores")
        assert f"--hash-inputs was {was} for the unfinished run" in str(e.value)
        assert "input file changed" not in str(e.value)


def test_the_fingerprint_holds_the_dtype_the_actors_compute_in(tiny_models, tmp_path):
    """--dtype auto is bf16 with GPUs and float32 without: a run killed on GPU actors does not
    resume on CPU actors into the same output (one output, scores of two precisions). An alias
    and its name are one dtype."""
    from prefsel.jobs import ActorResources

    data = write_jsonl(tmp_path / "in.jsonl", make_demo_pairs(4, seed=3))

    def fp(dtype: str, gpus: float) -> dict:
        cfg = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                             output=str(tmp_path / "o"), dtype=dtype, resources=ActorResources(gpus_per_actor=gpus))
        return fingerprint(cfg, [str(data)], "pairs")

    assert fp("auto", 1)["dtype"] == "bfloat16" and fp("auto", 0)["dtype"] == "float32"
    assert fp("auto", 1) != fp("auto", 0)
    assert fp("float32", 1) == fp("fp32", 0) == fp("auto", 0)


def test_an_unfinished_run_of_an_older_prefsel_with_dtype_auto_resumes(ray_local, tiny_models, tmp_path):
    """Before the fingerprint held the resolved dtype it held "auto": such a run resumes as it did
    then, rather than being refused for a difference no flag can undo."""
    rows = make_demo_pairs(8, seed=4)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                         output=str(tmp_path / "out"), chunk_rows=4, max_length=512)
    old = {**fingerprint(cfg, plan_source(cfg.data, cfg.chunk_rows).files, "pairs"), "dtype": "auto"}
    RunOutput(cfg.output, old, kind="scores")
    assert run_score(cfg)["rows_scored"] == len(rows)
