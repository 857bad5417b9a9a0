"""The default CPU server (llama.cpp, the real embedded GGUF) under concurrency and hang-ups.

llama.cpp is not safe across threads: every call into the backend — taking a sequence,
its passes, handing it back — must come from the scheduler's one thread. The model's
methods are instrumented (each call records its thread) and the server is driven hard.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

import specdec
from specdec.server.app import ServerConfig
from server_util import serving

pytest.importorskip("llama_cpp")

BACKEND_CALLS = ("new_cache", "release", "prefill", "forward", "forward_batch", "rewind", "cache_length")


@pytest.mark.slow
def test_llama_cpp_server_calls_the_backend_only_from_its_scheduler_thread_and_frees_every_slot():
    engine = specdec.load(backend="llama.cpp", device="cpu")
    model = engine.target
    threads: set[int] = set()
    for name in BACKEND_CALLS:
        def recorded(*args, _call=getattr(model, name), **kwargs):
            threads.add(threading.get_ident())
            return _call(*args, **kwargs)
        setattr(model, name, recorded)
    config = ServerConfig(model_name="gemma", max_running=4, max_waiting=64)
    with serving(engine, config) as (base, app):
        body = {"model": "gemma", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}

        def hang_up(_: int) -> None:
            with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                              json={**body, "max_tokens": 200, "stream": True}) as response:
                for i, _line in enumerate(response.iter_lines()):
                    if i >= 2:
                        return

        with concurrent.futures.ThreadPoolExecutor(max_workers=48) as pool:
            cut = [pool.submit(hang_up, i) for i in range(6)]
            # More requests than llama.cpp's 32 sequences: queued ones hold none, so none fails.
            answers = list(pool.map(lambda _: httpx.post(f"{base}/v1/completions", json=body, timeout=120),
                                    range(40)))
            for f in cut:
                f.result(timeout=120)
        assert [a.status_code for a in answers] == [200] * 40
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{base}/health").json()["running"] == 0
        owner = app.state.scheduler._thread.ident
    assert threads == {owner}
    assert model.free_sequences == model.max_sequences  # every slot handed back, hung-up ones too
