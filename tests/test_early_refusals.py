"""Settings a run cannot use are refused in the driver, before Ray starts and before an output
exists: a value found bad in the actors killed the run mid-way and left an unfinished output
whose fingerprint then refused the corrected rerun. An output that is, holds or lies inside one
of its inputs is refused before anything is deleted."""

from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from prefsel.cli import main

PAIRS = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(4)]


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "bogus"], "--dtype: must be one of auto, float32"),
    (["--attn", "flex_attention"], "attn: flex_attention needs a GPU"),
    (["--chat-template", "no/such/template.jinja"], "--chat-template: expected auto, none or a template file"),
    (["--max-length", "1"], "--max-length: must be at least 2"),
], ids=["dtype", "flex-on-cpu", "chat-template", "max-length"])
def test_score_refuses_a_bad_setting_before_any_output(tiny_models, tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "in.jsonl", PAIRS)
    out = tmp_path / "scores"
    code = main(["score", "--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data),
                 "--output", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1  # one line naming the flag, no actor traceback
    assert not out.exists() and not (tmp_path / "scores.partial").exists()


def test_annotate_refuses_flex_attention_on_cpu_actors(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "multi.jsonl", [{"prompt": "q", "responses": ["a", "b"]}])
    code = main(["annotate", "--data", str(data), "--reward-model", tiny_models[0], "--output", str(tmp_path / "m"),
                 "--attn", "flex_attention"])
    assert code == 2 and "flex_attention needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "m.partial").exists()


def test_a_template_file_is_made_absolute_for_the_read_tasks(tiny_models, tmp_path, monkeypatch):
    from prefsel.score_job import ScoreJobConfig

    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.chdir(tmp_path)
    cfg = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data="d", output="o",
                         chat_template="t.jinja")
    assert cfg.chat_template == str(tmp_path / "t.jinja")  # Ray workers do not share the driver's cwd


def test_overlap_of_an_output_and_an_input(tmp_path):
    from prefsel.run_output import refuse_overlap

    runs = tmp_path / "runs"
    (runs / "data").mkdir(parents=True)
    (runs / "data" / "in.jsonl").write_text("{}\n")
    (runs / "sel-scores").mkdir()
    for output, inp in [(runs / "data", runs / "data"),                  # the same folder
                        (runs, runs / "data" / "in.jsonl"),              # the output holds the input
                        (runs / "data" / "out", runs / "data"),          # the output inside an input folder
                        (str(runs / "data") + "/", runs / "data")]:      # a trailing slash is the same place
        with pytest.raises(ValueError, match="--output .* and --data .* overlap"):
            refuse_overlap(str(output), [("--data", str(inp))])
    (runs / "link").symlink_to(runs / "data")
    with pytest.raises(ValueError, match="overlap"):  # the same folder through a link
        refuse_overlap(str(runs / "link"), [("--data", str(runs / "data"))])
    with pytest.raises(ValueError, match="overlap"):
        refuse_overlap("s3://bucket/runs", [("--scores", "s3://bucket/runs/scores/")])
    # apart: a sibling whose name extends the output's, a hub name, an absent value, another bucket
    refuse_overlap(str(runs / "sel"), [("--scores", str(runs / "sel-scores")), ("--model", "Qwen/Qwen2.5-0.5B"),
                                       ("--tokenizer", None)])
    refuse_overlap("s3://bucket/runs", [("--scores", "s3://other/runs")])


def test_select_in_place_is_refused_and_the_scores_survive(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", PAIRS)
    scores = tmp_path / "scores"
    assert main(["score", "--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data),
                 "--output", str(scores)]) == 0
    before = sorted(p.name for p in (scores / "scores").iterdir())
    capsys.readouterr()
    assert main(["select", "--scores", str(scores), "--output", str(scores), "--overwrite"]) == 2
    assert "overlap" in capsys.readouterr().err
    assert sorted(p.name for p in (scores / "scores").iterdir()) == before
    assert json.loads((scores / "manifest.json").read_text())["complete"] is True
    # scoring into the folder that holds its input: refused too, the input kept
    assert main(["score", "--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data),
                 "--output", str(tmp_path), "--overwrite"]) == 2
    assert data.read_text().count("\n") == len(PAIRS)


def test_training_into_its_data_folder_is_refused_before_deleting(tmp_path):
    from prefsel.train.config import TrainConfig
    from prefsel.train.job import _prepare_output

    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS)
    cfg = TrainConfig("dpo", "some/model", str(folder), str(folder), overwrite=True, train_batch_size=4)
    with pytest.raises(ValueError, match="--output .* and --data .* overlap"):
        _prepare_output(cfg)
    assert (folder / "train.jsonl").exists()


def test_demo_refuses_a_ratio_that_selects_nothing(capsys, tmp_path):
    assert main(["demo", "--quick", "--ratio", "0.001", "--output", str(tmp_path / "demo")]) == 2
    assert "--ratio: 0.001 of 200 training pairs selects none" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_train_and_serve_check_the_template_where_they_start(tmp_path, monkeypatch, capsys):
    """One check of --chat-template (prefsel.tokenization.check_chat_template) in every config:
    train refuses a missing file before its output exists; serve before Ray Serve starts (a
    replica that fails to read it leaves a deployment that never becomes healthy). A relative
    file becomes absolute for the workers and replicas."""
    from prefsel.train.config import TrainConfig
    from serve.run import serve_main

    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    out = tmp_path / "run"
    assert main(["train", "dpo", "--model", "some/model", "--data", str(data), "--output", str(out),
                 "--chat-template", "no/such.jinja", "--train-batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template: expected auto, none or a template file, got 'no/such.jinja'" in err, err
    assert not out.exists()
    assert serve_main(["--policy", "P", "--reference", "R", "--chat-template", "no/such.jinja", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "chat_template: expected auto, none or a template file, got 'no/such.jinja'" in err, err
    assert "Value error" not in err

    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig("dpo", "some/model", str(data), str(out), chat_template="t.jinja", train_batch_size=4)
    assert cfg.chat_template == str(tmp_path / "t.jinja")
    assert serve_main(["--policy", "P", "--reference", "R", "--chat-template", "t.jinja", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["app_args"]["chat_template"] == str(tmp_path / "t.jinja")


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as starting Ray (every command starts it through
    prefsel.jobs.init_ray): a refusal must come first."""
    import prefsel.jobs

    def init_ray(num_cpus=None):
        raise AssertionError("Ray was started: the refusal came too late")

    monkeypatch.setattr(prefsel.jobs, "init_ray", init_ray)


def _over_long_commands(models: tuple[str, str], tmp_path) -> dict[str, tuple[list[str], str]]:
    """{command: (argv asking more tokens than the tiny models' 1024 positions, the flag named)}."""
    pairs = write_jsonl(tmp_path / "in.jsonl", PAIRS)
    multi = write_jsonl(tmp_path / "multi.jsonl", [{"prompt": "q", "responses": ["a", "b"]}])
    return {
        "score": (["score", "--policy", models[0], "--reference", models[1], "--data", str(pairs),
                   "--output", str(tmp_path / "out"), "--max-length", "2048"], "--max-length"),
        "annotate": (["annotate", "--data", str(multi), "--reward-model", models[0], "--output", str(tmp_path / "out"),
                      "--max-length", "2048"], "--max-length"),
        "generate": (["generate", "--prompts", str(pairs), "--model", models[0], "--backend", "hf",
                      "--output", str(tmp_path / "out"), "--max-prompt-length", "2048"], "--max-prompt-length"),
        "train": (["train", "dpo", "--model", models[0], "--data", str(pairs), "--output", str(tmp_path / "out"),
                   "--chat-template", "none", "--max-length", "2048"], "--max-length"),
    }


@pytest.mark.parametrize("command", ["score", "annotate", "generate", "train"])
def test_a_length_over_the_models_positions_is_refused_before_ray(tiny_models, tmp_path, capsys, no_ray, command):
    """An explicit length over the models' positions (the configs' max_position_embeddings) is
    refused in the driver, in one line naming the flag, the value and the limit with where it
    comes from: taken as given, a sequence that long crashed a learned-position model in the
    forward (on CUDA breaking the actor) or was silently scored past a rotary model's range."""
    argv, flag = _over_long_commands(tiny_models, tmp_path)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"prefsel {command}: error: {flag}: 2048 exceeds the models' 1024 positions " \
           f"(max_position_embeddings of {tiny_models[0]}'s config); give at most 1024" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_hf_generate_refuses_max_tokens_that_leave_no_room_for_a_prompt(tiny_models, tmp_path, capsys, no_ray):
    pairs = write_jsonl(tmp_path / "in.jsonl", PAIRS)
    argv = ["generate", "--prompts", str(pairs), "--model", tiny_models[0], "--backend", "hf",
            "--output", str(tmp_path / "out"), "--max-tokens", "1024"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"prefsel generate: error: --max-tokens: 1024 leaves no room for a prompt in the model's 1024 "
                   f"positions (max_position_embeddings of {tiny_models[0]}'s config); give at most 1023"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_serve_refuses_a_max_length_over_the_models_positions_before_ray(tiny_models, capsys, no_ray):
    """The Serve app is refused where it is built (serve.app.build_app, which `serve run` calls
    too), before Ray starts: a replica would otherwise crash on its first long pair."""
    from serve.app import build_app
    from serve.run import serve_main

    assert serve_main(["--policy", tiny_models[0], "--reference", tiny_models[1], "--max-length", "2048"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"prefsel serve: error: max_length: 2048 exceeds the models' 1024 positions " \
           f"(max_position_embeddings of {tiny_models[0]}'s config)" in err, err
    with pytest.raises(ValueError, match=r"^max_length: 1025 exceeds the models' 1024 positions"):
        build_app({"policy": tiny_models[0], "reference": tiny_models[1], "max_length": 1025})
    build_app({"policy": tiny_models[0], "reference": tiny_models[1], "max_length": 1024})  # the limit itself is taken


def test_select_with_data_checks_its_flags_before_scoring_and_reuses_its_scores(ray_local, tiny_models, tmp_path, capsys):
    """`prefsel select --data`: a bad selection flag is refused before the corpus is scored (it
    was refused after, and the corrected rerun then met its own finished scores); the same
    command again selects from the finished scores of the same inputs and settings without
    scoring again; scores of other settings are refused, never selected from."""
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"q{i}", "chosen": f"a{i} x", "rejected": f"b{i} y z"}
                                               for i in range(8)])
    base = ["select", "--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data)]
    sel = tmp_path / "sel"
    assert main([*base, "--output", str(sel), "--ratio", "1.5"]) == 2
    assert "--ratio must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "sel-scores").exists() and not (tmp_path / "sel-scores.partial").exists()
    assert main([*base, "--output", str(sel), "--ratio", "0.5"]) == 0
    first = json.loads((tmp_path / "sel-scores" / "summary.json").read_text())
    capsys.readouterr()
    # another selection from the same scores: reused (the summary is the first run's, unchanged)
    assert main([*base, "--output", str(tmp_path / "sel2"), "--scores-output", str(tmp_path / "sel-scores"),
                 "--ratio", "0.25"]) == 0
    assert "holds the finished scores of these inputs, models and settings" in capsys.readouterr().out
    assert json.loads((tmp_path / "sel-scores" / "summary.json").read_text()) == first
    assert json.loads((tmp_path / "sel2" / "summary.json").read_text())["rows_selected"] == 2
    # other scoring settings into the same scores output: refused, naming the change, not reused
    assert main([*base, "--output", str(tmp_path / "sel3"), "--scores-output", str(tmp_path / "sel-scores"),
                 "--beta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "sel-scores holds the finished scores of other inputs, models or settings" in err
    assert "beta (0.1 -> 0.5)" in err and not (tmp_path / "sel3").exists()
    # a finished selection output is refused before anything is scored for it
    assert main([*base, "--output", str(sel), "--scores-output", str(tmp_path / "fresh")]) == 2
    assert "sel already exists; pass --overwrite" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "fresh.partial").exists()
    # --overwrite replaces the selection; the matching scores are still reused, not made again
    assert main([*base, "--output", str(sel), "--ratio", "0.25", "--overwrite"]) == 0
    assert "holds the finished scores of these inputs" in capsys.readouterr().out
    assert json.loads((tmp_path / "sel-scores" / "summary.json").read_text()) == first
    assert json.loads((sel / "summary.json").read_text())["rows_selected"] == 2
