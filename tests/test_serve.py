"""The Ray Serve gap endpoint over real HTTP on 127.0.0.1: parity with the batch job, batching,
bad input (4xx naming pair index and field, replica survives), bearer-token auth, run flags."""

from __future__ import annotations

import json
import socket
import threading
import time
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
# Chat pairs whose responses carry outer whitespace: --keep-response-whitespace changes their ids.
CHAT_PAIRS = [{"prompt": [{"role": "user", "content": r["prompt"]}],
               "chosen": [{"role": "assistant", "content": f"  {r['chosen']}\n"}],
               "rejected": [{"role": "assistant", "content": f"{r['rejected']} "}]} for r in PAIRS[:6]]
VERBATIM = dict(strip_responses=False, exact_continuation=False)  # both batch tokenization options off


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
def batch_scores_verbatim(ray_local, tiny_models, tmp_path_factory):
    """The batch pipeline's scores of CHAT_PAIRS with --keep-response-whitespace and
    --tokenize-responses-alone (parsed by the score command's own flags)."""
    from prefsel.cli import build_parser, score_config
    from prefsel.score_job import run_score

    d = tmp_path_factory.mktemp("serve_parity_verbatim")
    data = write_jsonl(d / "chat.jsonl", CHAT_PAIRS)
    args = build_parser().parse_args(["score", "--policy", tiny_models[0], "--reference", tiny_models[1],
                                      "--data", str(data), "--output", str(d / "out"),
                                      "--keep-response-whitespace", "--tokenize-responses-alone"])
    cfg = score_config(args)
    assert (cfg.strip_responses, cfg.exact_continuation) == (False, False)
    run_score(cfg)
    return read_scores(d / "out").to_pylist()


@pytest.fixture(scope="module")
def server(ray_local, tiny_models, batch_scores, batch_scores_verbatim):
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
        serve.run(build_app({**common, **VERBATIM}), name="gap-verbatim", route_prefix="/verbatim")
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


def test_parity_with_batch_pipeline_with_its_tokenization_options(server, batch_scores_verbatim):
    """A batch run made with --keep-response-whitespace --tokenize-responses-alone is reproduced by
    an endpoint started with the same options (and differs from the default endpoint's scores)."""
    from serve.run import build_parser, resolve_settings

    args = resolve_settings(build_parser().parse_args(["--policy", "P", "--reference", "R",
                                                       "--keep-response-whitespace", "--tokenize-responses-alone"]))
    assert {k: args["app_args"][k] for k in VERBATIM} == VERBATIM  # the same flags as `prefsel score`
    got = server.post("/verbatim/v1/gap", json={"pairs": CHAT_PAIRS})
    assert got.status_code == 200, got.text
    for want, res in zip(batch_scores_verbatim, got.json()["results"], strict=True):
        for col in SCORE_COLUMNS:
            assert abs(want[col] - res[col]) <= 1e-5, (want["row_id"], col, want[col], res[col])
    default = _post(server, {"pairs": CHAT_PAIRS}).json()["results"]
    assert [r["chosen_tokens"] for r in default] != [r["chosen_tokens"] for r in got.json()["results"]]
    info = server.get("/verbatim/v1/models").json()
    assert {k: info[k] for k in VERBATIM} == VERBATIM


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
    b1 = _post(server, {"pairs": PAIRS[:3], "beta": 1})  # an integer beta is a number
    assert b1.status_code == 200 and b1.json()["model"]["beta"] == 1
    for a, b in zip(base, b1.json()["results"]):
        assert b["gap"] == pytest.approx(10 * a["gap"], rel=1e-6, abs=1e-6)
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


FAIL_MARK = "FAIL-IN-FORWARD"  # the prompt the failing scorer below raises on


def test_a_failing_batch_is_scored_request_by_request(server, tiny_models):
    """When the merged forward of a batch raises, each request of the batch is scored alone: the
    request that fails alone gets the error it gets when sent alone (a 500), its batch-mates their
    scores (before: Serve handed the batch's exception to every request in it).

    No real input fails in the forward (validation, tokenization and the length checks come
    first), so the scorer is monkeypatched, inside the replica: a GapScorer subclass deployed
    next to the others wraps its PairScorer.logprobs to raise for any call holding a pair whose
    prompt is FAIL_MARK. Everything else (HTTP, batching, models) is the real endpoint."""
    from ray import serve

    from serve.app import GapScorer, ScorerArgs

    class FailingOnMark(GapScorer.func_or_class):
        async def __init__(self, args):
            await super().__init__(args)
            from prefsel.formats import to_example

            marked = self.pair_tokenizer.encode(to_example({**PAIRS[0], "prompt": FAIL_MARK}, "pairs")).prompt_ids
            real = self.scorer.logprobs

            def logprobs(pairs):
                if any(p.prompt_ids == marked for p in pairs):
                    raise RuntimeError("forward failed on the marked pair")
                return real(pairs)

            self.scorer.logprobs = logprobs

    args = ScorerArgs(policy=tiny_models[0], reference=tiny_models[1], max_length=MAX_LENGTH,
                      max_batch_size=16, batch_wait_timeout_s=0.5)  # a long wait: the 7 requests below merge
    serve.run(serve.deployment(FailingOnMark, ray_actor_options={"num_cpus": 0.25}).bind(args),
              name="gap-fail", route_prefix="/fail")
    try:
        marked = {"pairs": [PAIRS[1], {**PAIRS[0], "prompt": FAIL_MARK}]}
        groups = [PAIRS[i : i + 1 + i % 2] for i in range(6)]
        alone = [server.post("/fail/v1/gap", json={"pairs": g}) for g in groups]
        assert all(r.status_code == 200 for r in alone), [r.text for r in alone]
        failed_alone = server.post("/fail/v1/gap", json=marked)
        assert failed_alone.status_code == 500, failed_alone.text
        before = server.get("/fail/v1/stats").json()

        def call(i):
            return server.post("/fail/v1/gap", json=marked if i == 3 else {"pairs": groups[i - (i > 3)]})

        with ThreadPoolExecutor(7) as pool:
            responses = list(pool.map(call, range(7)))
        good = responses[:3] + responses[4:]
        for want, got in zip(alone, good, strict=True):
            assert got.status_code == 200, got.text
            for a, b in zip(want.json()["results"], got.json()["results"], strict=True):
                for col in SCORE_COLUMNS:
                    assert abs(a[col] - b[col]) <= 1e-5, col
        assert responses[3].status_code == failed_alone.status_code, responses[3].text
        after = server.get("/fail/v1/stats").json()
        assert after["split_batches"] > before["split_batches"], after  # the marked one was in a merged batch
    finally:
        serve.delete("gap-fail")


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
    # strict types and bounds: a bool is not a number, nor a numeric string; beta stays finite
    ("beta bool", {"pairs": [GOOD], "beta": True}, 422, ["beta"]),
    ("beta numeric string", {"pairs": [GOOD], "beta": "0.5"}, 422, ["beta"]),
    ("beta huge", {"pairs": [GOOD], "beta": 1e308}, 422, ["beta", "1000"]),
    ("format wrong type", {"pairs": [GOOD], "format": 1}, 422, ["format"]),
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
    for path in ("/auth/v1/models", "/auth/v1/stats"):
        assert server.get(path).status_code == 401, path
        assert server.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert server.get(path, headers=ok).status_code == 200, path
    # the docs page and its schema are open (the page's own fetch of the schema sends no token);
    # the schema declares the bearer scheme on exactly the routes that check it
    docs = server.get("/auth/docs")
    assert docs.status_code == 200 and "/auth/openapi.json" in docs.text
    spec = server.get("/auth/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    secured = {path for path, ops in spec["paths"].items() for op in ops.values() if op.get("security")}
    assert secured == {"/v1/gap", "/v1/models", "/v1/stats"}
    assert spec["servers"] == [{"url": "/auth"}]  # "Try it out" calls the prefixed routes
    open_spec = server.get("/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {}) and "servers" not in open_spec
    r = server.post("/auth/v1/gap", json={"pairs": PAIRS[:1]})
    assert r.status_code == 401 and "bearer" in r.json()["detail"]
    assert server.post("/auth/v1/gap", json={"pairs": PAIRS[:1]}, headers={"Authorization": TOKEN}).status_code == 401
    r = server.post("/auth/v1/gap", json={"pairs": PAIRS[:1]}, headers=ok)
    assert r.status_code == 200 and len(r.json()["results"]) == 1
    # the open app has no token
    assert server.get("/v1/models").status_code == 200


# ---- limits: one request cannot exhaust the replica --------------------------------------------

MiB = 2**20


def _raw_post(port: int, path: str, headers: dict, body_parts: list[bytes], timeout: float = 10.0):
    """POST over a raw socket, the body sent from a thread while the response is read, so that a
    server answering before it has the whole body is seen doing so.
    Returns (status, JSON body, seconds from the first byte sent to the whole response)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()

    def send():
        try:
            sock.sendall(head)
            for part in body_parts:
                sock.sendall(part)
        except OSError:
            pass  # the server answered and closed: the rest is not wanted

    sender = threading.Thread(target=send, daemon=True)
    t0 = time.perf_counter()
    sender.start()
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head_raw, _, rest = data.partition(b"\r\n\r\n")
        lines = head_raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(fields["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        elapsed = time.perf_counter() - t0
    finally:
        sock.close()
    sender.join(timeout)
    return status, json.loads(rest[:n]), elapsed


def _chunked(parts: list[bytes]) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]


class _HealthProbe:
    """Polls /healthz from a thread; records (status or exception name, seconds) per probe."""

    def __init__(self, base_url, timeout: float = 2.0):
        self.base_url, self.timeout = base_url, timeout
        self.seen: list[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(base_url=self.base_url, timeout=self.timeout) as c:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    outcome = c.get("/healthz").status_code
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                self.seen.append((outcome, time.perf_counter() - t))
                time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_body_over_the_cap_is_413_before_it_is_read(server):
    """A body over max_body_bytes (8 MiB by default) is refused at once: from Content-Length
    before any of it is read, or while counting a chunked upload; /healthz answers throughout."""
    port = server.base_url.port
    info = server.get("/v1/models").json()
    assert info["max_body_bytes"] == 8 * MiB and info["max_chars_per_field"] == 200_000
    prefix = b'{"pairs": [{"prompt": "Q?", "rejected": "no", "chosen": "' + b"x" * 65536
    with _HealthProbe(server.base_url) as probe:
        # Content-Length announces 50 MB, and only 64 KiB are sent: the answer cannot wait for the rest
        status, body, dt = _raw_post(port, "/v1/gap", {"Content-Type": "application/json",
                                                       "Content-Length": str(50 * MiB)}, [prefix])
        assert status == 413 and "max_body_bytes 8388608" in body["detail"], body
        assert dt < 1.0, dt
        # chunked (no Content-Length): 10 MiB offered, refused once the count passes 8 MiB
        status, body, dt_chunked = _raw_post(port, "/v1/gap", {"Content-Type": "application/json",
                                                               "Transfer-Encoding": "chunked"},
                                             _chunked([prefix] + [b"x" * (256 * 1024)] * 40))
        assert status == 413 and "max_body_bytes" in body["detail"], body
        assert dt_chunked < 1.0, dt_chunked
        time.sleep(0.2)
    assert probe.seen and all(s == 200 and t < 1.0 for s, t in probe.seen), probe.seen
    print(f"\n413 latency: Content-Length {dt * 1000:.0f} ms, chunked 10 MiB {dt_chunked * 1000:.0f} ms")
    assert _post(server, {"pairs": PAIRS[:1]}).status_code == 200


def test_field_over_the_cap_is_413_before_tokenizing_and_memory_stays_bounded(server):
    """A 6 MB `chosen` (under the body cap, over max_chars_per_field) is a 413 naming the field
    within a second, without tokenizing it: the replica's RSS barely moves and /healthz answers.
    (Before: such a request tokenized for minutes on the event loop and took gigabytes.)"""
    before = server.get("/v1/stats").json()
    huge = {"pairs": [PAIRS[0], PAIRS[1], {"prompt": "Q?", "chosen": "x " * 3_000_000, "rejected": "no"}]}
    msgs = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 300_000}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "n"}]}
    latencies = []
    with _HealthProbe(server.base_url) as probe:
        for _ in range(3):
            t = time.perf_counter()
            r = _post(server, huge)
            latencies.append(time.perf_counter() - t)
            assert r.status_code == 413, r.text
            assert r.json()["detail"].startswith("pairs[2].chosen: 6000000 characters exceed max_chars_per_field 200000")
        r = _post(server, {"pairs": [msgs]})  # chat messages count their content
        assert r.status_code == 413 and r.json()["detail"].startswith("pairs[0].chosen: "), r.text
        time.sleep(0.2)
    after = server.get("/v1/stats").json()
    assert max(latencies) < 1.0, latencies
    assert probe.seen and all(s == 200 and t < 1.0 for s, t in probe.seen), probe.seen
    growth = after["rss_bytes"] - before["rss_bytes"]
    peak_growth = after["peak_rss_bytes"] - before["peak_rss_bytes"]
    print(f"\nfield 413 latency max {max(latencies) * 1000:.0f} ms; replica RSS {before['rss_bytes'] / MiB:.0f} -> "
          f"{after['rss_bytes'] / MiB:.0f} MiB, peak {before['peak_rss_bytes'] / MiB:.0f} -> "
          f"{after['peak_rss_bytes'] / MiB:.0f} MiB")
    assert growth < 300 * MiB and peak_growth < 300 * MiB, (growth, peak_growth)
    assert after["rejected_requests"] - before["rejected_requests"] == 4


# ---- auth before the body, constant-time comparison ---------------------------------------------


def test_auth_is_checked_before_the_body(server):
    """A missing or wrong token is 401 whatever the body: malformed, invalid or oversized."""
    wrong = {"Authorization": "Bearer wrong", "Content-Type": "application/json"}
    bodies = (b'{"pairs": [', b"[1, 2]", json.dumps({"pairs": [], "beta": True}).encode())
    for content in bodies:
        for headers in (wrong, {"Content-Type": "application/json"}):
            r = server.post("/auth/v1/gap", content=content, headers=headers)
            assert r.status_code == 401 and "bearer" in r.json()["detail"], (content, r.text)
    status, body, dt = _raw_post(server.base_url.port, "/auth/v1/gap", {**wrong, "Content-Length": str(50 * MiB)}, [b"{"])
    assert status == 401 and dt < 1.0, (status, body, dt)
    ok = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    assert server.post("/auth/v1/gap", content=bodies[0], headers=ok).status_code == 400
    assert server.post("/auth/v1/gap", content=bodies[2], headers=ok).status_code == 422


def test_token_is_compared_in_constant_time(monkeypatch):
    import hmac
    from types import SimpleNamespace

    from fastapi import HTTPException

    from serve.app import GapScorer

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    scorer = SimpleNamespace(auth_token=TOKEN)
    auth = GapScorer.func_or_class._auth
    auth(scorer, SimpleNamespace(headers={"authorization": f"Bearer {TOKEN}"}))
    assert calls == [(TOKEN.encode(), TOKEN.encode())]
    with pytest.raises(HTTPException) as e:
        auth(scorer, SimpleNamespace(headers={"authorization": f"Bearer {TOKEN[:-1]}X"}))
    assert e.value.status_code == 401 and len(calls) == 2


# ---- the contract: documented errors, strict and bounded inputs, finite outputs -----------------


def test_non_finite_scores_are_an_error_not_null():
    """beta is bounded so beta * log-prob differences stay finite; a pair the models give no finite
    log-prob is a 422 naming it, never a 200 with null gaps."""
    from types import SimpleNamespace

    from fastapi import HTTPException

    from prefsel.scoring import score_columns
    from prefsel.tokenization import TokenizedExample
    from serve.app import GapScorer

    scorer = SimpleNamespace(_reject=lambda status, msg: HTTPException(status_code=status, detail=msg))
    pair = TokenizedExample(prompt_ids=[1, 2], response_ids=[[3], [4]])
    check = GapScorer.func_or_class._check_finite
    check(scorer, [score_columns(pair, (-1.0, -2.0, -1.5, -1.5), 0.1)])
    with pytest.raises(HTTPException) as e:
        check(scorer, [score_columns(pair, (-1.0, -2.0, -1.5, -1.5), 0.1),
                       score_columns(pair, (float("-inf"), -2.0, -1.5, -1.5), 0.1)])
    assert e.value.status_code == 422 and e.value.detail.startswith("pairs[1]: ")


def test_error_responses_are_documented(server):
    spec = server.get("/openapi.json").json()
    gap = spec["paths"]["/v1/gap"]["post"]
    assert spec["components"]["schemas"]["ErrorResponse"]["required"] == ["detail"]
    for code in ("400", "401", "413", "422"):
        assert gap["responses"][code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    body = gap["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["beta"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0.0, "maximum": 1000.0}
    assert "Content-Type" in spec["info"]["description"]


def test_openapi_contract_with_generated_requests(server):
    """schemathesis generates requests from the live OpenAPI schema (valid and invalid ones, a
    bounded number per operation): no 5xx, every status documented, every body matching its schema."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    spec = server.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    base = str(server.base_url)
    deadline = time.monotonic() + 40  # a time bound well under a minute, whatever the machine
    seen: dict = {}
    for path, methods in spec["paths"].items():
        for method in methods:
            op = schema[path][method.upper()]
            modes = [schemathesis.GenerationMode.POSITIVE]
            if "requestBody" in methods[method]:  # negative cases need something to break
                modes.append(schemathesis.GenerationMode.NEGATIVE)
            for mode in modes:

                @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case):
                    if time.monotonic() > deadline:
                        return
                    response = case.call(base_url=base, timeout=30)
                    seen[(path, response.status_code)] = seen.get((path, response.status_code), 0) + 1
                    case.validate_response(response, checks=checks)

                run()
    print("\nschemathesis (path, status): count", seen)
    assert seen.get(("/v1/gap", 422), 0) > 10 and all(status < 500 for _, status in seen)


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
    assert a["max_length"] is None  # the models' context, as `prefsel score` (the file sets none)
    assert out["proxy_location"] == "HeadOnly" and out["runtime_env"] == {}
    assert serve_main(["--policy", "P", "--reference", "R", "--num-replicas", "2", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["http"] == {"host": "127.0.0.1", "port": 8000} and out["app_args"]["num_replicas"] == 2


def test_build_app_options():
    from serve.app import ServeArgs, build_app, deployment_options

    shape = ServeArgs(policy="p", reference="r", min_replicas=1, max_replicas=3, num_gpus=0.5)
    assert deployment_options(shape) == {
        "ray_actor_options": {"num_gpus": 0.5},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8.0},
    }
    with pytest.raises(ValueError, match="reference"):
        build_app({"policy": "p"})
    with pytest.raises(ValueError, match="bogus"):
        build_app({"policy": "p", "reference": "r", "bogus": 1})


def test_max_length_defaults_to_the_models_context(tiny_models):
    """No max_length given: rows longer than the models' positions are refused, not scored."""
    from serve.app import ServeArgs, load_scorer

    pair_tokenizer, _, max_length = load_scorer(ServeArgs(policy=tiny_models[0], reference=tiny_models[1]))
    assert max_length == pair_tokenizer.max_length == 1024  # the tiny models have 1024 positions


def test_serve_starts_ray_through_the_shared_init(monkeypatch):
    """`prefsel serve` without RAY_ADDRESS starts Ray the way every prefsel command does
    (prefsel.jobs.init_ray: a local Ray on 127.0.0.1 only, tests/test_local_ray.py), never with a
    plain ray.init() that listens on every interface; Serve's proxy is started after it."""
    import ray
    from ray import serve as ray_serve

    import prefsel.jobs
    from serve.run import build_parser, run

    class Started(Exception):
        pass

    calls = []

    def init_ray(num_cpus=None):
        calls.append("init_ray")
        raise Started

    def refuse(what):
        def call(*a, **kw):
            raise AssertionError(f"{what} called")
        return call

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(prefsel.jobs, "init_ray", init_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `prefsel serve`
    monkeypatch.setattr(ray, "init", refuse("ray.init"))
    monkeypatch.setattr(ray_serve, "start", refuse("serve.start before Ray"))
    with pytest.raises(Started):
        run(build_parser().parse_args(["--policy", "P", "--reference", "R"]))
    assert calls == ["init_ray"]


def test_response_flags_merge_over_a_config_file(tmp_path):
    """--keep-response-whitespace / --tokenize-responses-alone are the score command's flags; not
    given, a config file's value stays (and with neither, the batch scorer's default: True)."""
    from serve.run import build_parser, resolve_settings

    cfg = tmp_path / "c.yaml"
    cfg.write_text("applications:\n  - args: {policy: P, reference: R, strip_responses: false}\n")

    def app_args(*argv: str) -> dict:
        a = resolve_settings(build_parser().parse_args(list(argv)))["app_args"]
        return {k: a[k] for k in ("strip_responses", "exact_continuation")}

    assert app_args("--config", str(cfg)) == {"strip_responses": False, "exact_continuation": True}
    assert app_args("--config", str(cfg), "--tokenize-responses-alone") == {"strip_responses": False,
                                                                           "exact_continuation": False}
    assert app_args("--policy", "P", "--reference", "R") == {"strip_responses": True, "exact_continuation": True}


# ---- `prefsel serve --config`: every key of the file is read or refused ----------------------------


def _serve_config(tmp_path, models, port: int, **app) -> Path:
    import yaml

    cfg = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "gap-env", "route_prefix": "/", "import_path": "serve.app:build_app",
                             "args": {"policy": models[0], "reference": models[1], "max_length": MAX_LENGTH},
                             "deployments": [{"name": "GapScorer", "ray_actor_options": {"num_cpus": 0.5}}], **app}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prefsel_serve_config_takes_the_token_from_runtime_env(tiny_models, tmp_path):
    """`prefsel serve --config FILE` whose application runtime_env sets PREFSEL_AUTH_TOKEN in
    env_vars requires the token, as `serve run FILE` does (before: the runtime_env was ignored and
    the endpoint answered without auth). A real `prefsel serve` process, with PREFSEL_AUTH_TOKEN
    not in its own environment, over HTTP on 127.0.0.1."""
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    cfg = _serve_config(tmp_path, tiny_models, port, runtime_env={"env_vars": {"PREFSEL_AUTH_TOKEN": TOKEN}})
    env = {k: v for k, v in os.environ.items() if k not in ("PREFSEL_AUTH_TOKEN", "RAY_ADDRESS")}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("prefsel")), "serve", "--config", str(cfg)],
                                cwd=Path(__file__).resolve().parents[1], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 300
            while True:  # up once the replica answers /healthz (which never needs the token)
                assert proc.poll() is None, log.read_text()[-4000:]
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(1)
            r = client.post("/v1/gap", json={"pairs": PAIRS[:1]})
            assert r.status_code == 401 and "bearer" in r.json()["detail"], r.text
            assert client.get("/v1/models").status_code == 401
            r = client.post("/v1/gap", json={"pairs": PAIRS[:1]}, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and len(r.json()["results"]) == 1, r.text
    finally:
        proc.send_signal(signal.SIGINT)  # prefsel serve shuts Serve and its local Ray down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_print_config_shows_runtime_env_and_proxy_location(tiny_models, tmp_path, capsys):
    from serve.run import serve_main

    cfg = _serve_config(tmp_path, tiny_models, 9124, runtime_env={"env_vars": {"PREFSEL_AUTH_TOKEN": TOKEN, "A": "1"}})
    assert serve_main(["--config", str(cfg), "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["proxy_location"] == "EveryNode" and out["name"] == "gap-env"
    assert out["runtime_env"] == {"env_vars": {"PREFSEL_AUTH_TOKEN": "***", "A": "1"}}  # the token not shown
    assert out["app_args"]["num_cpus"] == 0.5 and out["http"] == {"host": "127.0.0.1", "port": 9124}


def test_a_deployments_runtime_env_goes_over_the_applications(tiny_models, tmp_path, capsys):
    """The GapScorer entry's ray_actor_options.runtime_env over the application's, env_vars merged
    one by one, as Serve merges them for `serve run` (before: refused as a key not read)."""
    import yaml

    from serve.run import serve_main

    path = _serve_config(tmp_path, tiny_models, 9126, runtime_env={"env_vars": {"A": "1", "B": "1"}, "pip": ["x"]})
    cfg = yaml.safe_load(path.read_text())
    cfg["applications"][0]["deployments"][0]["ray_actor_options"]["runtime_env"] = {
        "env_vars": {"B": "2", "PREFSEL_AUTH_TOKEN": TOKEN}, "pip": ["y"]}
    path.write_text(yaml.safe_dump(cfg))
    assert serve_main(["--config", str(path), "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runtime_env"] == {"env_vars": {"A": "1", "B": "2", "PREFSEL_AUTH_TOKEN": "***"}, "pip": ["y"]}
    assert "runtime_env" not in out["app_args"] and out["app_args"]["num_cpus"] == 0.5


def _edit(cfg: dict, where: tuple, value) -> dict:
    d = cfg
    for k in where[:-1]:
        d = d[k]
    d[where[-1]] = value
    return cfg


UNREAD_CASES = [
    # (where in the file, value, the message's start after "--config FILE: ")
    (("grpc_options",), {"port": 9000}, "grpc_options: not read by prefsel serve"),
    (("proxy_locaton",), "HeadOnly", "proxy_locaton: not read"),
    (("http_options", "bogus"), 1, "http_options.bogus: not read"),
    (("applications", 0, "logging_config"), {"log_level": "DEBUG"}, "applications[0].logging_config: not read"),
    (("applications", 0, "deployments", 0, "health_check_period_s"), 5,
     "applications[0].deployments[0].health_check_period_s: not read"),
    (("applications", 0, "deployments", 0, "autoscaling_config"), {"max_replicas": 2, "upscale_delay_s": 1},
     "applications[0].deployments[0].autoscaling_config.upscale_delay_s: not read"),
    (("applications", 0, "deployments", 0, "ray_actor_options", "memory"), 10**9,
     "applications[0].deployments[0].ray_actor_options.memory: not read"),
    (("applications", 0, "deployments", 0, "ray_actor_options", "runtime_env"), {"working_dir": "."},
     "applications[0].deployments[0].ray_actor_options.runtime_env: runtime_envs in the Serve config support "
     "only remote URIs"),  # Ray's own check
    (("applications", 0, "deployments", 0, "num_replicas"), "auto",
     "applications[0].deployments[0].num_replicas: 'auto' is not read"),
    (("applications", 0, "deployments", 0, "name"), "Other",
     "applications[0].deployments[0].name: 'Other': the application's one deployment is GapScorer"),
    (("applications", 0, "import_path"), "my.app:build",
     "applications[0].import_path: prefsel serve runs serve.app:build_app"),
    (("applications", 1), {"name": "b", "route_prefix": "/b", "import_path": "serve.app:build_app"},
     "applications[1] (prefsel serve runs one application): not read"),
    (("proxy_location",), "Bogus", "proxy_location: Input should be 'Disabled', 'HeadOnly' or 'EveryNode'"),
    (("applications", 0, "runtime_env"), {"working_dir": "."}, "applications[0].runtime_env: runtime_envs in the "
     "Serve config support only remote URIs"),  # Ray's own check, as `serve run` makes it
]


@pytest.mark.parametrize("where,value,message", UNREAD_CASES, ids=[_c[2].split(":")[0] for _c in UNREAD_CASES])
def test_config_keys_prefsel_serve_does_not_read_are_refused(tiny_models, tmp_path, capsys, where, value, message):
    """Every key of --config is read or refused by name, before Ray starts (before: any key but a
    few was silently ignored)."""
    import yaml

    from serve.run import serve_main

    path = _serve_config(tmp_path, tiny_models, 9125)
    cfg = yaml.safe_load(path.read_text())
    if where == ("applications", 1):
        cfg["applications"].append(value)
    else:
        _edit(cfg, where, value)
    path.write_text(yaml.safe_dump(cfg))
    assert serve_main(["--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"prefsel serve: error: --config {path}: {message}"), err
