"""The OpenAI-compatible server: real `openai` client, continuous batching, admission, bad input."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import kvshrink
from kvshrink.serve import build_engine
from kvshrink.serve.app import read_metrics, run_in_thread


@pytest.fixture(scope="module")
def smollm2():
    return kvshrink.load("smollm2")


@pytest.fixture()
def serve(smollm2):
    running = []

    def make(budget_tokens=20_000, max_batch=64):
        model, tok = smollm2
        engine = build_engine(model, tok, budget_tokens=budget_tokens, max_batch=max_batch)
        server, thread, url = run_in_thread(engine, "smollm2")
        running.append((server, thread))
        return engine, url

    yield make
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


def test_openai_client_completion_chat_stream_and_vote(serve, smollm2):
    from openai import OpenAI

    _, url = serve()
    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    model, tok = smollm2
    expected = kvshrink.generate(model, tok, "The capital of France is", max_new_tokens=8)
    assert out.choices[0].text == expected.texts[0]
    assert out.usage.completion_tokens == 8 and out.usage.model_extra["kv_reads"] > 0
    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                          max_tokens=12, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12, temperature=0,
        stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    voted = client.completions.create(model="smollm2", prompt="Start with 3. Then add 4. What is the result? Answer: ", max_tokens=4,
                                      temperature=0.8, n=4, seed=1, extra_body={"vote": True, "task": "arith"})
    assert len(voted.choices) == 4 and voted.model_extra["vote"]["samples"] == 4


def test_concurrent_clients_all_served_in_order_within_budget(serve):
    engine, url = serve(budget_tokens=400)  # ~ 3 of these requests at once
    order, seen_live = [], []

    def client(i):
        body = json.dumps({"prompt": f"Request number {i} says", "max_tokens": 6, "temperature": 0}).encode()
        r = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(r, timeout=120).read())
        order.append(i)
        return out

    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen_live.append(read_metrics(url)["kvshrink_live_kv_tokens"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        futures = []
        for i in range(32):
            futures.append(pool.submit(client, i))
            time.sleep(0.01)  # submission order = i
        results = [f.result() for f in futures]
    stop.set()
    watcher.join()
    assert len(results) == 32 and all(len(r["choices"]) == 1 and r["choices"][0]["finish_reason"] for r in results)
    assert len({r["id"] for r in results}) == 32
    ids = sorted((r["id"] for r in results), key=lambda x: int(x.split("-")[1]))  # ids number requests as they arrive
    assert [i for i in engine.admitted if i in ids] == ids  # admitted first come, first served
    assert max(seen_live) <= engine.budget and max(seen_live) > 0
    assert read_metrics(url)["kvshrink_queued_requests"] == 0


def wait_until_idle(url: str, seconds: float = 30) -> None:
    """Until /metrics shows no live KV tokens (the engine frees a finished request's rows after answering)."""
    deadline = time.time() + seconds
    while time.time() < deadline and read_metrics(url)["kvshrink_live_kv_tokens"] > 0:
        time.sleep(0.1)


def test_bad_input_keeps_serving(serve):
    engine, url = serve(budget_tokens=300)

    def post(path, data):
        r = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            return 200, json.loads(urllib.request.urlopen(r, timeout=60).read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert post("/v1/completions", b"{not json")[0] == 400
    assert post("/v1/completions", json.dumps({"model": "gpt-9", "prompt": "hi"}).encode())[0] == 404
    code, body = post("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": -3}).encode())
    assert code == 400 and "max_tokens" in body["error"]["message"]
    code, body = post("/v1/completions", json.dumps({"prompt": "word " * 400, "max_tokens": 8}).encode())
    assert code == 400 and "budget" in body["error"]["message"]
    # a client that disconnects mid-stream: its slots are freed
    r = urllib.request.Request(f"{url}/v1/completions", data=json.dumps({"prompt": "Once upon a time", "max_tokens": 200,
                                                                          "temperature": 0, "stream": True}).encode(),
                               headers={"Content-Type": "application/json"})
    stream = urllib.request.urlopen(r, timeout=60)
    stream.readline()
    stream.close()
    wait_until_idle(url)
    assert read_metrics(url)["kvshrink_live_kv_tokens"] == 0 and read_metrics(url)["kvshrink_running_requests"] == 0
    assert post("/v1/completions", json.dumps({"prompt": "still here", "max_tokens": 2}).encode())[0] == 200
    code, body = post("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 0}).encode())
    assert code == 400 and "max_tokens" in body["error"]["message"]  # 0 is refused, not replaced by a default
    code, body = post("/v1/chat/completions", json.dumps({"messages": [{"content": "hi"}], "max_tokens": 2}).encode())
    assert code == 400 and "role" in body["error"]["message"]

    # a step that fails (at prefill, then while decoding) ends only the requests in flight, with a 500
    for method in ("_prefill_piece", "_pick"):
        original = getattr(engine, method)
        calls = []

        def fail_once(*args, original=original, calls=calls):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return original(*args)

        setattr(engine, method, fail_once)
        payload = json.dumps({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}).encode()
        codes = [post("/v1/completions", payload)[0] for _ in range(3)]
        assert codes.count(500) == 1 and codes.count(200) == 2, (method, codes)
        setattr(engine, method, original)
    wait_until_idle(url)
    assert read_metrics(url)["kvshrink_live_kv_tokens"] == 0


def test_streamed_text_equals_decoding_everything(smollm2):
    """The engine decodes line by line (not the whole sequence per token): the text and the concatenated
    deltas must equal decoding all tokens at once."""
    from kvshrink.serve.engine import Request, SamplingParams, Sequence

    model, tok = smollm2
    engine = build_engine(model, tok, budget_tokens=1000)
    text = "def f(x):\n    return x * 2  # doubles\n\nprint(f(21))\nÉtoile, naïve café — ünïcode ✓\n"
    ids = tok(text)["input_ids"]
    deltas = []
    request = Request("r", [1], SamplingParams(max_tokens=len(ids) + 1), lambda event: deltas.append(event["delta"]))
    seq = Sequence(0)
    for token in ids:
        engine._emit(request, seq, token)
    assert seq.text == tok.decode(ids, skip_special_tokens=True) == "".join(deltas)


def test_admission_follows_the_ratio_sequences_really_reach(smollm2):
    """An engine told to expect CR 8 whose sequences compress at 1 (here: no eviction at all) must admit by
    what the running sequences really hold. Admitting at 8 overfills the budget, pauses the newest
    request and lets it straight back in, re-reading its prompt every step."""
    from kvshrink.policies import CachePolicy
    from kvshrink.serve.engine import Engine, SamplingParams

    model, tok = smollm2
    engine = Engine(model, tok, CachePolicy(), budget_tokens=110, expected_cr=8.0)  # ~2 requests of 48 tokens
    prefills = []
    real_prefill = engine._prefill_piece
    engine._prefill_piece = lambda cache, ids: prefills.append(len(ids)) or real_prefill(cache, ids)
    prompt = tok("The Python language was created by a programmer who liked short readable programs. " * 3)["input_ids"][:40]
    requests = [engine.submit(prompt, SamplingParams(max_tokens=8), lambda event: None) for _ in range(4)]
    for _ in range(60):
        engine.step()
        assert engine.live_tokens() <= engine.budget
        if all(r.done for r in requests):
            break
    assert all(r.done and len(r.sequences[0].tokens) == 8 for r in requests)
    assert prefills == [40] * 4  # each prompt read once: nobody was paused and let back in


def test_running_sequences_keep_decoding_while_a_long_prompt_is_read(smollm2):
    """Chunked prefill: a long prompt is read one chunk per step, and every step still gives each running
    sequence its next token. The chunked request's greedy tokens equal reading its prompt at once."""
    from kvshrink.generation import generate_ids
    from kvshrink.policies import CachePolicy
    from kvshrink.serve.engine import SamplingParams

    model, tok = smollm2
    engine = build_engine(model, tok, budget_tokens=5000, prefill_chunk=32)
    short = engine.submit(tok("Once upon a time")["input_ids"], SamplingParams(max_tokens=40, ignore_eos=True), lambda event: None)
    engine.step()
    assert len(short.sequences[0].tokens) == 2  # its first token at joining, the next one from the step
    long_ids = tok("The Python language was created by a programmer who liked short readable programs. " * 12)["input_ids"][:150]
    assert len(long_ids) == 150
    long = engine.submit(long_ids, SamplingParams(max_tokens=6), lambda event: None)
    steps = 0
    while not long.sequences[0].tokens:
        before = len(short.sequences[0].tokens)
        engine.step()
        steps += 1
        assert len(short.sequences[0].tokens) == before + 1  # the running sequence never waits a step
        assert engine.live_tokens() <= engine.budget
    assert steps == -(-150 // 32)  # 150 tokens in chunks of 32
    while not long.done:
        engine.step()
    expected, _, _ = generate_ids(model, [long_ids], CachePolicy(), max_new_tokens=6, eos_token_id=tok.eos_token_id)
    assert long.sequences[0].tokens == expected[0]
