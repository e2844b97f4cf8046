"""The Ray Serve gap endpoint over real HTTP on 127.0.0.1: parity with the batch job, batching,
bad input (4xx naming pair index and field, replica survives), bearer-token auth, run flags."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import read_scores, write_jsonl
from prefsel.demo_data import make_demo_pairs
from prefsel.scoring import SCORE_COLUMNS

PAIRS = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in make_demo_pairs(12, seed=5)]
TOKEN = "s3cret-token"
MAX_PAIRS = 16
MAX_TOKENS = 1500
MAX_LENGTH = 96


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def batch_scores(ray_local, tiny_models, tmp_path_factory):
    """The batch pipeline's scores of PAIRS (run before Serve takes CPUs from the local cluster)."""
    from prefsel.score_job import ScoreJobConfig, run_score

    d = tmp_path_factory.mktemp("serve_parity")
    data = write_jsonl(d / "pairs.jsonl", PAIRS)
    run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data), output=str(d / "out")))
    return read_scores(d / "out").to_pylist()


@pytest.fixture(scope="module")
def server(ray_local, tiny_models, batch_scores):
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(policy=tiny_models[0], reference=tiny_models[1], num_cpus=0.5, max_length=MAX_LENGTH,
                  max_pairs_per_request=MAX_PAIRS, max_tokens_per_request=MAX_TOKENS)
    try:
        serve.run(build_app({**common, "max_batch_size": 16, "batch_wait_timeout_s": 0.05}),
                  name="gap", route_prefix="/")
        serve.run(build_app({**common, "auth_token": TOKEN}), name="gap-auth", route_prefix="/auth")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        serve.shutdown()


def _post(client, body, **kw):
    return client.post("/v1/gap", json=body, **kw)


def test_health_models_docs(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    info = server.get("/v1/models").json()
    assert info["beta"] == 0.1 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["max_length"] == MAX_LENGTH and info["policy"].endswith("policy")
    spec = server.get("/openapi.json").json()
    assert "/v1/gap" in spec["paths"]
    assert server.get("/docs").status_code == 200


def test_parity_with_batch_pipeline(server, batch_scores):
    r = _post(server, {"pairs": PAIRS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == len(PAIRS) == len(batch_scores)
    assert body["model"]["beta"] == 0.1
    for want, got in zip(batch_scores, body["results"]):
        for col in SCORE_COLUMNS:
            assert abs(want[col] - got[col]) <= 1e-5, (want["row_id"], col, want[col], got[col])


def test_curl_style_form_content_type_is_read_as_json(server):
    """`curl -d '{...}'` (the README's example) labels the body as a form; it must still work."""
    import json as _json

    want = _post(server, {"pairs": PAIRS[:2]}).json()["results"]
    r = server.post("/v1/gap", content=_json.dumps({"pairs": PAIRS[:2]}),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == want


def test_per_request_beta_and_formats(server):
    base = _post(server, {"pairs": PAIRS[:3]}).json()["results"]
    b5 = _post(server, {"pairs": PAIRS[:3], "beta": 0.5}).json()
    assert b5["model"]["beta"] == 0.5
    for a, b in zip(base, b5["results"]):
        assert b["chosen_logp"] == pytest.approx(a["chosen_logp"], abs=1e-6)
        assert b["gap"] == pytest.approx(5 * a["gap"], rel=1e-6, abs=1e-6)
    p = PAIRS[0]
    conv = {"chosen": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}]}
    hh = {"chosen": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['chosen'].strip()}",
          "rejected": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['rejected'].strip()}"}
    for pair, fmt in ((conv, None), (conv, "conversation"), (hh, None), (hh, "hh")):
        r = _post(server, {"pairs": [pair], **({"format": fmt} if fmt else {})})
        assert r.status_code == 200, r.text
        assert np.isfinite(r.json()["results"][0]["gap"])


def test_concurrent_requests_are_batched_and_exact(server):
    groups = [PAIRS[i % 12 : i % 12 + 1 + i % 3] for i in range(20)]
    alone = [_post(server, {"pairs": g}).json()["results"] for g in groups]
    before = server.get("/v1/stats").json()
    bad = {"pairs": [PAIRS[0], {"prompt": "Q?", "chosen": "", "rejected": "no"}]}

    def call(i):
        if i % 5 == 4:  # bad requests interleaved with good ones must not poison their batches
            return _post(server, bad)
        return _post(server, {"pairs": groups[i]})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(20)))
    for i, r in enumerate(responses):
        if i % 5 == 4:
            assert r.status_code == 422 and "pairs[1]" in r.json()["detail"]
            continue
        assert r.status_code == 200, r.text
        for a, b in zip(alone[i], r.json()["results"]):
            for col in SCORE_COLUMNS:
                assert abs(a[col] - b[col]) <= 1e-5, (i, col)
    after = server.get("/v1/stats").json()
    assert after["requests"] - before["requests"] == 16
    assert after["max_batch_requests"] > 1, after  # several requests went through one scorer call
    assert after["batches"] - before["batches"] < 16


GOOD = PAIRS[0]
BAD_CASES = [
    # (name, raw body or json, status, substrings of the message)
    ("malformed json", b'{"pairs": [', 400, ["malformed JSON"]),
    ("body not an object", [1, 2], 422, ["body"]),
    ("missing pairs", {}, 422, ["pairs", "missing"]),
    ("pairs not a list", {"pairs": "abc"}, 422, ["pairs"]),
    ("pair not an object", {"pairs": [GOOD, 5]}, 422, ["pairs[1]"]),
    ("missing chosen", {"pairs": [GOOD, GOOD, {"prompt": "Q?", "rejected": "no"}]}, 422,
     ["pairs[2]", "'chosen'", "missing"]),
    ("empty chosen", {"pairs": [GOOD, GOOD, {"prompt": "Q?", "chosen": "   ", "rejected": "no"}]}, 422,
     ["pairs[2]: field 'chosen': empty response"]),
    ("empty rejected", {"pairs": [{"prompt": "Q?", "chosen": "yes", "rejected": ""}]}, 422,
     ["pairs[0]", "'rejected'", "empty response"]),
    ("chosen wrong type", {"pairs": [GOOD, {"prompt": "Q?", "chosen": 5, "rejected": "no"}]}, 422,
     ["pairs[1]", "'chosen'"]),
    ("prompt wrong type", {"pairs": [{"prompt": 3.5, "chosen": "a", "rejected": "b"}]}, 422, ["pairs[0]", "'prompt'"]),
    ("bad role", {"pairs": [{"prompt": [{"role": "user", "content": "hi"}],
                             "chosen": [{"role": "robot", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]}]}, 422,
     ["pairs[0]", "chosen[0].role"]),
    ("conversation mismatch", {"format": "conversation", "pairs": [
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "rejected": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "c"}]}]}, 422,
     ["pairs[0]", "rejected"]),
    ("hh without assistant", {"format": "hh", "pairs": [{"chosen": "\n\nHuman: hi\n\nAssistant: y",
                                                         "rejected": "\n\nHuman: hi"}]}, 422, ["pairs[0]", "rejected"]),
    ("multi rows", {"pairs": [{"prompt": "Q", "responses": ["a", "b"]}]}, 422, ["format"]),
    ("negative beta", {"pairs": [GOOD], "beta": -1}, 422, ["beta"]),
    ("beta wrong type", {"pairs": [GOOD], "beta": "high"}, 422, ["beta"]),
    ("unknown format", {"pairs": [GOOD], "format": "csv"}, 422, ["format"]),
    ("unknown field", {"pairs": [GOOD], "betta": 1}, 422, ["betta"]),
    ("empty pairs", {"pairs": []}, 422, ["pairs", "empty"]),
    ("too many pairs", {"pairs": [GOOD] * (MAX_PAIRS + 1)}, 413, ["pairs", "max_pairs_per_request"]),
    ("pair too long", {"pairs": [GOOD, {"prompt": "Q?", "chosen": "yes " * 200, "rejected": "no"}]}, 422,
     ["pairs[1]", "'chosen'", "too long"]),
    ("too many tokens", {"pairs": [{"prompt": "Q " * 20, "chosen": "a b c " * 5, "rejected": "d e f " * 5}] * MAX_PAIRS},
     413, ["max_tokens_per_request", "pairs["]),
]


@pytest.mark.parametrize("name,body,status,needles", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_4xx_naming_field_and_index(server, name, body, status, needles):
    if isinstance(body, bytes):
        r = server.post("/v1/gap", content=body, headers={"content-type": "application/json"})
    else:
        r = _post(server, body)
    assert r.status_code == status, (name, r.status_code, r.text)
    msg = r.json()["detail"]
    assert isinstance(msg, str)
    for n in needles:
        assert n in msg, (name, msg)


def test_replica_survives_bad_requests(server):
    for _ in range(3):
        assert _post(server, {"pairs": [{"prompt": "Q?", "chosen": "", "rejected": "x"}]}).status_code == 422
        assert server.post("/v1/gap", content=b"nope", headers={"content-type": "application/json"}).status_code == 400
    r = _post(server, {"pairs": PAIRS[:2]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert server.get("/v1/stats").json()["rejected_requests"] >= 3


def test_auth(server):
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert server.get("/auth/healthz").status_code == 200
    for path in ("/auth/v1/models", "/auth/v1/stats", "/auth/openapi.json", "/auth/docs"):
        assert server.get(path).status_code == 401, path
        assert server.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert server.get(path, headers=ok).status_code == 200, path
    r = server.post("/auth/v1/gap", json={"pairs": PAIRS[:1]})
    assert r.status_code == 401 and "bearer" in r.json()["detail"]
    assert server.post("/auth/v1/gap", json={"pairs": PAIRS[:1]}, headers={"Authorization": TOKEN}).status_code == 401
    r = server.post("/auth/v1/gap", json={"pairs": PAIRS[:1]}, headers=ok)
    assert r.status_code == 200 and len(r.json()["results"]) == 1
    # the open app has no token
    assert server.get("/v1/models").status_code == 200


def test_run_flags_and_config(capsys):
    from serve.run import serve_main

    cfg = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
    assert serve_main(["--config", str(cfg), "--policy", "P", "--port", "9123", "--num-gpus", "0.25",
                       "--auth-token", "x", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["http"] == {"host": "127.0.0.1", "port": 9123}
    a = out["app_args"]
    assert a["policy"] == "P" and a["reference"] == "./models/reference" and a["num_gpus"] == 0.25
    assert a["min_replicas"] == 1 and a["max_replicas"] == 4 and a["auth_token"] == "***"
    assert serve_main(["--policy", "P", "--reference", "R", "--num-replicas", "2", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["http"] == {"host": "127.0.0.1", "port": 8000} and out["app_args"]["num_replicas"] == 2


def test_build_app_options():
    from serve.app import build_app, deployment_options

    assert deployment_options({"min_replicas": 1, "max_replicas": 3, "num_gpus": 0.5}) == {
        "ray_actor_options": {"num_gpus": 0.5},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8.0},
    }
    with pytest.raises(ValueError, match="reference"):
        build_app({"policy": "p"})
    with pytest.raises(ValueError, match="bogus"):
        build_app({"policy": "p", "reference": "r", "bogus": 1})
