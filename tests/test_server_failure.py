"""An engine failure on one request is a 500 for that request only; the server keeps serving."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from specdec import Engine
from specdec.server.app import ServerConfig, create_app
from server_util import free_port
import tiny

POISON = 77  # a token id that makes the model's forward pass raise


@pytest.fixture(scope="module")
def failing_server():
    model = tiny.llama(seed=0, dtype=torch.float32)

    def explode(module, args):
        if bool((args[0] == POISON).any()):
            raise RuntimeError("simulated device fault")

    model.get_input_embeddings().register_forward_pre_hook(explode)  # sees every token, prefill included
    engine = Engine(tiny.wrap(model, "fragile"), tiny.tokenizer(), drafter="ngram")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerConfig(model_name="fragile")),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_engine_failure_is_500_for_that_request_only(failing_server):
    bad = httpx.post(f"{failing_server}/v1/completions",
                     json={"model": "fragile", "prompt": [1, POISON, 5], "max_tokens": 5}, timeout=30)
    assert bad.status_code == 500 and "simulated device fault" in bad.json()["error"]["message"]
    with httpx.stream("POST", f"{failing_server}/v1/completions", timeout=30,
                      json={"model": "fragile", "prompt": [1, POISON], "max_tokens": 5, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert "server_error" in lines[-2] and lines[-1] == "data: [DONE]"
    client = openai.OpenAI(base_url=f"{failing_server}/v1", api_key="x", max_retries=0)
    ok = client.completions.create(model="fragile", prompt="the quick", max_tokens=5, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
