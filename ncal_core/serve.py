"""`python -m ncal_core.serve`: a model loaded once, answering classification requests over HTTP (FastAPI, uvicorn).

POST /v1/classify {"texts": [...]} -> {"predictions": [{"label": ..., "scores": {label: probability}}]}, the
scores as `infer` gives them (the run's tau applied); GET /health. Requests that arrive together are scored
in one batch: the first waits at most --max_wait_ms for others, up to --max_batch_size texts. A bad request
gets a 4xx with {"error": "..."} and the server goes on serving.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint's parameter types at definition time
import asyncio
import errno
import json
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ncal_core.cli import flag, parse_config
from ncal_core.data.rows import Example, check_class_names
from ncal_core.errors import NCALError, run_cli
from ncal_core.evaluation.predictor import (
    check_device,
    label_scorer,
    load_folder,
    model_labels,
    open_model_folder,
    pick_device,
    pick_dtype,
    run_tau,
    say_tau,
    tau_offset,
)


@dataclass
class ServeConfig:
    """Flags of `python -m ncal_core.serve`."""

    model_path: str | None = flag(None, "a training output, checkpoint or export of ours that records its labels, or a "
                                        "classification checkpoint naming them in id2label: a folder or a hub id")
    base_model_path: str | None = flag(None, "the base checkpoint under an adapter, a folder or a hub id")
    revision: str | None = flag(None, "the hub revision of a --model_path that is a hub id; default: main")
    host: str = flag("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = flag(8000, "port to listen on")
    labels: list[str] | None = flag(None, "the class names, when the model folder records none (a classification "
                                        "head's: in the order of its outputs)")
    logit_adjust_tau: float | None = flag(None, "post-hoc logit adjustment (default: the training run's tau)")
    max_batch_size: int = flag(32, "texts scored in one batch at most, gathered from requests that arrive together")
    max_wait_ms: float = flag(5.0, "how long the first request of a batch waits for others")
    max_texts: int = flag(256, "texts one request may carry")
    dtype: str = flag("auto", "auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16")
    device: str | None = flag(None, "where the model runs (default: cuda when there is a GPU, else cpu)")

    def check(self) -> None:
        if not self.model_path:
            raise NCALError("--model_path: required (a training output, checkpoint or export)")
        for name in ("max_batch_size", "max_texts", "port"):
            if getattr(self, name) < 1:
                raise NCALError(f"--{name}: must be >= 1, not {getattr(self, name)}")
        if self.port > 65535:
            raise NCALError(f"--port: must be <= 65535, not {self.port}")
        if self.max_wait_ms < 0:
            raise NCALError(f"--max_wait_ms: must be >= 0, not {self.max_wait_ms}")
        check_device(self.device, self.dtype)
        check_class_names("--labels", self.labels)


class Classifier:
    """The model, its labels and adjustment: texts -> one prediction each, as infer scores them."""

    def __init__(self, cfg: ServeConfig) -> None:
        folder = open_model_folder(cfg.model_path, cfg.base_model_path, cfg.revision)
        run = folder.run
        labels = model_labels(folder, cfg.labels)
        if not labels:
            raise NCALError(f"--model_path {cfg.model_path}: records no label set (serve a training output, "
                            "checkpoint or export of ours, or pass --labels)")
        self.labels = labels
        tau = run_tau(run, cfg.logit_adjust_tau)
        device = pick_device(cfg.device)
        predictor = load_folder(folder, dtype=pick_dtype(cfg.dtype, device), device=device)
        say_tau([tau], given=cfg.logit_adjust_tau is not None)
        self.score = label_scorer(predictor, self.labels, tau_offset(tau, cfg.model_path, run, self.labels),
                                  batch_size=cfg.max_batch_size)

    def __call__(self, texts: list[str]) -> list[dict[str, Any]]:
        rows = [Example(id=str(i), messages=[{"role": "user", "content": text}], label=None, where=f"text {i}")
                for i, text in enumerate(texts)]
        probs = self.score(rows).exp().cpu()
        return [{"label": self.labels[int(p.argmax())], "scores": dict(zip(self.labels, p.tolist()))} for p in probs]


class Batcher:
    """Requests queued as they come; one task scores them in batches of at most max_batch texts, in a thread."""

    def __init__(self, classify, max_batch: int, max_wait_s: float) -> None:
        self.classify, self.max_batch, self.max_wait_s = classify, max_batch, max_wait_s
        self.queue: asyncio.Queue = asyncio.Queue()

    async def submit(self, texts: list[str]) -> list[dict[str, Any]]:
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, done))
        return await done

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            size, deadline = len(batch[0][0]), asyncio.get_running_loop().time() + self.max_wait_s
            while size < self.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), deadline - asyncio.get_running_loop().time())
                except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
                    break
                batch.append(item)
                size += len(item[0])
            texts = [text for item, _ in batch for text in item]
            try:
                answers = await asyncio.to_thread(self.classify, texts)
            except Exception as err:  # noqa: BLE001 (each waiting request gets the failure)
                for _, done in batch:
                    done.set_exception(err)
                continue
            start = 0
            for item, done in batch:
                done.set_result(answers[start:start + len(item)])
                start += len(item)


def parse_request(body: bytes, max_texts: int) -> tuple[int, list[str] | str]:
    """(status, texts) of a well-formed request, else (4xx status, the error)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return 400, "the body is not valid JSON"
    texts = data.get("texts") if isinstance(data, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return 422, 'expected {"texts": [strings]}'
    if not texts:
        return 422, "texts: at least one text is needed"
    if len(texts) > max_texts:
        return 413, f"texts: {len(texts)} texts, more than the {max_texts} a request may carry"
    if not all(t.strip() for t in texts):
        return 422, "texts: a text is empty"
    return 200, texts


def make_app(classify, labels: list[str], cfg: ServeConfig):
    """The FastAPI application around a classifier (any texts -> predictions callable)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    batcher = Batcher(classify, cfg.max_batch_size, cfg.max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="NCAL classifier", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": cfg.model_path, "labels": labels}

    @app.post("/v1/classify")
    async def classify_texts(request: Request):
        status, texts = parse_request(await request.body(), cfg.max_texts)
        if status != 200:
            return JSONResponse({"error": texts}, status_code=status)
        try:
            return {"predictions": await batcher.submit(texts)}
        except NCALError as err:  # a text the prompt cannot hold, say
            return JSONResponse({"error": str(err)}, status_code=422)

    return app


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, taken before the model is read: a port in use or an address this machine
    does not have is one line naming the flag."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise NCALError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        flag = "--port" if err.errno == errno.EADDRINUSE else "--host"
        raise NCALError(f"{flag}: cannot listen on {host}:{port} ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv, description=__doc__.splitlines()[0], prog="python -m ncal_core.serve")
    cfg.check()
    try:
        import uvicorn
    except ImportError:
        raise NCALError("python -m ncal_core.serve needs FastAPI and uvicorn: pip install -e \".[serve]\"") from None
    sock = listen(cfg.host, cfg.port)
    classifier = Classifier(cfg)
    config = uvicorn.Config(make_app(classifier, classifier.labels, cfg), host=cfg.host, port=cfg.port,
                            log_level="info")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run_cli(main)
