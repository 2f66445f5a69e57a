"""`python -m ncal_core.serve` through a real HTTP client on loopback: answers equal infer's, a burst of concurrent
requests is batched and answered alike, bad requests get a 4xx and the server keeps serving."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from training_runs import free_port, run, tmwpl_rows, trained_lora_run, write_jsonl

uvicorn = pytest.importorskip("uvicorn")

from ncal_core.serve import Classifier, ServeConfig, make_app  # noqa: E402

PROB_ATOL = 1e-5  # fp32; the server's batches pad other rows together than infer's


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    out, env = trained_lora_run(root)
    cfg = ServeConfig(model_path=str(out), port=free_port(), max_batch_size=8, max_wait_ms=20, max_texts=16)
    classifier = Classifier(cfg)
    calls = []

    def counted(texts):
        calls.append(len(texts))
        return classifier(texts)

    config = uvicorn.Config(make_app(counted, classifier.labels, cfg), host="127.0.0.1", port=cfg.port,
                            log_level="warning")
    handle = uvicorn.Server(config)
    thread = threading.Thread(target=handle.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not handle.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{cfg.port}", "root": root, "run": out, "env": env, "calls": calls,
           "labels": classifier.labels}
    handle.should_exit = True
    thread.join(timeout=10)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/classify", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def texts(n: int, seed: int) -> list[str]:
    return [row["question"] for row in tmwpl_rows(n, seed=seed, prefix="q")]


def test_health_names_the_model_and_its_labels(server):
    with urllib.request.urlopen(f"{server['url']}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "model": str(server["run"]), "labels": server["labels"]}


def test_answers_equal_infers_and_a_concurrent_burst_is_batched(server):
    root = server["root"]
    asked = texts(12, seed=3)
    prompts = write_jsonl(root / "prompts.jsonl", [{"id": str(i), "question": t} for i, t in enumerate(asked)])
    result = run("ncal_core.infer", ["--model_path", str(server["run"]), "--prompts_file", str(prompts),
                                     "--output_file", str(root / "infer.jsonl")], server["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [json.loads(line) for line in (root / "infer.jsonl").read_text().splitlines()]
    calls_before = len(server["calls"])
    with ThreadPoolExecutor(max_workers=12) as pool:  # one text a request, all at once
        answers = list(pool.map(lambda t: post(server["url"], json.dumps({"texts": [t]}).encode()), asked))
    assert all(status == 200 for status, _ in answers)
    for (_, body), want in zip(answers, expected, strict=True):
        (got,) = body["predictions"]
        assert got["label"] == want["prediction"]
        assert got["scores"] == pytest.approx(want["scores"], abs=PROB_ATOL)
    batches = server["calls"][calls_before:]
    assert sum(batches) == 12 and max(batches) <= 8 and len(batches) < 12  # gathered, and bounded


@pytest.mark.parametrize("body, status, error", [
    (b"{not json", 400, "the body is not valid JSON"),
    (b'{"texts": "one text"}', 422, 'expected {"texts": [strings]}'),
    (b'{"texts": [1, 2]}', 422, 'expected {"texts": [strings]}'),
    (b'["a"]', 422, 'expected {"texts": [strings]}'),
    (b'{"texts": []}', 422, "texts: at least one text is needed"),
    (b'{"texts": ["  "]}', 422, "texts: a text is empty"),
    (json.dumps({"texts": ["x"] * 17}).encode(), 413, "texts: 17 texts, more than the 16 a request may carry"),
])
def test_a_bad_request_gets_a_4xx_and_the_server_keeps_serving(server, body, status, error):
    assert post(server["url"], body) == (status, {"error": error})
    code, answer = post(server["url"], json.dumps({"texts": texts(2, seed=5)}).encode())
    assert code == 200 and len(answer["predictions"]) == 2
