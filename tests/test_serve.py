"""The OpenAI-compatible server: real `openai` client, continuous batching, admission, bad input."""

from __future__ import annotations

import contextlib
import copy
import json
import random
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


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """A 2-layer random Llama: for tests of the server's plumbing, where each engine step should cost nothing."""
    return kvshrink.load(tiny_model_dir)


@pytest.fixture()
def serve(request):
    running = []

    def make(budget_tokens=20_000, max_batch=64, model="smollm2"):
        """Serve the model of fixture `model` under that name."""
        loaded, tok = request.getfixturevalue(model)
        engine = build_engine(loaded, tok, budget_tokens=budget_tokens, max_batch=max_batch)
        server, thread, url = run_in_thread(engine, model)
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
    expected_chat = kvshrink.generate(model, tok, "What is the capital of France?", chat=True, max_new_tokens=12)
    assert chat.choices[0].message.content == expected_chat.texts[0]
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12, temperature=0,
        stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    voted = client.completions.create(model="smollm2", prompt="Start with 3. Then add 4. What is the result? Answer: ", max_tokens=4,
                                      temperature=0.8, n=4, seed=1, extra_body={"vote": True, "task": "arith"})
    assert len(voted.choices) == 4 and voted.model_extra["vote"]["samples"] == 4


def test_concurrent_clients_all_served_in_order_within_budget(serve):
    engine, url = serve(budget_tokens=400)  # the bytes of 400 vanilla tokens: 6 of these requests at once, a row of 64 slots each
    order, seen_live, seen_allocated, seen_bytes = [], [], [], []

    def client(i):
        body = json.dumps({"prompt": f"Request number {i} says", "max_tokens": 6, "temperature": 0}).encode()
        r = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(r, timeout=120).read())
        order.append(i)
        return out

    stop = threading.Event()

    def watch():
        while not stop.is_set():
            m = read_metrics(url)
            seen_live.append(m["kvshrink_live_kv_tokens"])
            seen_allocated.append(m["kvshrink_allocated_kv_tokens"])
            seen_bytes.append(m["kvshrink_allocated_kv_bytes"])
            assert m["kvshrink_budget_kv_bytes"] == engine.budget and m["kvshrink_budget_kv_tokens"] == 400
            assert 0 <= m["kvshrink_kv_fragmentation"] < 1 and m["kvshrink_allocated_kv_bytes"] >= m["kvshrink_live_kv_bytes"]
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
    assert max(seen_live) <= max(seen_allocated) <= 400 and max(seen_live) > 0 and max(seen_bytes) <= engine.budget
    assert read_metrics(url)["kvshrink_queued_requests"] == 0


def send(url: str, path: str, body: dict | bytes, timeout: float = 120) -> tuple[int, list[dict]]:
    """The status and the JSON answer: one body, or each event of a stream (not its [DONE])."""
    r = urllib.request.Request(f"{url}{path}", data=body if isinstance(body, bytes) else json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=timeout) as response:
            status, streamed, text = response.status, response.headers.get_content_type() == "text/event-stream", response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, [json.loads(exc.read())]
    if streamed:
        return status, [json.loads(line[6:]) for line in text.decode().splitlines() if line.startswith("data: {")]
    return status, [json.loads(text)]


def finish_reasons(payloads: list[dict]) -> list[str]:
    """Each choice's finish reason, from a body or from a stream's last chunk per choice."""
    return [c["finish_reason"] for p in payloads for c in p.get("choices", []) if c.get("finish_reason")]


def wait_until_idle(url: str, seconds: float = 30) -> None:
    """Until /metrics shows no live KV tokens (the engine frees a finished request's rows after answering)."""
    deadline = time.time() + seconds
    while time.time() < deadline and read_metrics(url)["kvshrink_live_kv_tokens"] > 0:
        time.sleep(0.1)


def test_bad_input_keeps_serving(serve):
    engine, url = serve(budget_tokens=300)

    assert send(url, "/v1/completions", b"{not json")[0] == 400
    assert send(url, "/v1/completions", {"model": "gpt-9", "prompt": "hi"})[0] == 404
    code, (body,) = send(url, "/v1/completions", {"prompt": "hi", "max_tokens": -3})
    assert code == 400 and "max_tokens" in body["error"]["message"]
    code, (body,) = send(url, "/v1/completions", {"prompt": "word " * 400, "max_tokens": 8})
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
    assert send(url, "/v1/completions", {"prompt": "still here", "max_tokens": 2})[0] == 200
    code, (body,) = send(url, "/v1/completions", {"prompt": "hi", "max_tokens": 0})
    assert code == 400 and "max_tokens" in body["error"]["message"]  # 0 is refused, not replaced by a default
    code, (body,) = send(url, "/v1/chat/completions", {"messages": [{"content": "hi"}], "max_tokens": 2})
    assert code == 400 and "role" in body["error"]["message"]

    # a request that fails inside a step (reading its prompt, then sampling) gets a 500; the next ones are served
    for method in ("_prefill_piece", "_pick"):
        original = getattr(engine, method)
        calls = []

        def fail_once(*args, original=original, calls=calls):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return original(*args)

        setattr(engine, method, fail_once)
        payload = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        codes = [send(url, "/v1/completions", payload)[0] for _ in range(3)]
        assert codes.count(500) == 1 and codes.count(200) == 2, (method, codes)
        setattr(engine, method, original)
    wait_until_idle(url)
    assert read_metrics(url)["kvshrink_live_kv_tokens"] == 0


def test_streamed_text_equals_decoding_everything(smollm2):
    """The detokenizer decodes line by line (not the whole sequence per token): the text and the concatenated
    deltas must equal decoding all tokens at once; a stop string cuts both just before it."""
    from kvshrink.serve.detokenizer import Detokenizer

    _, tok = smollm2
    text = "def f(x):\n    return x * 2  # doubles\n\nprint(f(21))\nÉtoile, naïve café — ünïcode ✓\n"
    ids = tok(text)["input_ids"]
    whole = tok.decode(ids, skip_special_tokens=True)
    detok = Detokenizer(tok)
    deltas = [detok.push(ids[:i + 1], final=i == len(ids) - 1)[0] for i in range(len(ids))]
    assert detok.text == whole == "".join(deltas)
    detok, deltas, stopped = Detokenizer(tok, stop=("f(21)",)), [], False
    for i in range(len(ids)):
        delta, stopped = detok.push(ids[:i + 1], final=False)
        deltas.append(delta)
        if stopped:
            break
    assert stopped and detok.text == whole[:whole.index("f(21)")] == "".join(deltas)


def test_admission_follows_the_ratio_sequences_really_reach(smollm2):
    """An engine told to expect CR 8 whose sequences compress at 1 (here: no eviction at all) must admit by
    what the running sequences really hold. Admitting at 8 (three rows of 64 slots) overfills the budget (three
    rows of 128), pauses the newest request and lets it straight back in, re-reading its prompt every step."""
    from kvshrink.cache import footprint
    from kvshrink.policies import CachePolicy
    from kvshrink.serve.engine import Engine, SamplingParams

    model, tok = smollm2
    budget = 300 * footprint(model, CachePolicy()).slot  # 300 slots' bytes: 2 requests of 128 slots
    engine = Engine(model, tok, CachePolicy(), budget_bytes=budget, expected_cr=8.0)
    prefills = []
    real_prefill = engine._prefill_piece
    engine._prefill_piece = lambda cache, ids: prefills.append(len(ids)) or real_prefill(cache, ids)
    prompt = tok("The Python language was created by a programmer who liked short readable programs. " * 10)["input_ids"][:120]
    requests = [engine.submit(prompt, SamplingParams(max_tokens=8), lambda event: None) for _ in range(4)]
    for _ in range(60):
        engine.step()
        assert engine.live_tokens() <= engine.allocated_slots() <= 300 and engine.allocated_bytes() <= engine.budget
        if all(r.done for r in requests):
            break
    assert all(r.done and len(r.sequences[0].tokens) == 8 for r in requests)
    assert prefills == [120] * 4  # each prompt read once: nobody was paused and let back in


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
        assert engine.live_tokens() <= engine.allocated_slots() and engine.allocated_bytes() <= engine.budget
    assert steps == -(-150 // 32)  # 150 tokens in chunks of 32
    while not long.done:
        engine.step()
    expected, _, _ = generate_ids(model, [long_ids], CachePolicy(), max_new_tokens=6, eos_token_id=tok.eos_token_id)
    assert long.sequences[0].tokens == expected[0]


# Hostile requests beside innocent ones, served by the tiny model (its steps cost nothing) on one thread (which
# stays fast on a busy machine; `one_thread` holds to the end of the module, hence these tests come last).


def innocent(i: int, max_tokens: int) -> tuple[str, dict]:
    """A sampled streaming request that must end by length: a completion for even i, a chat for odd i."""
    body = {"max_tokens": max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True}
    if i % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"Tell story number {i}."}]}
    return "/v1/completions", {**body, "prompt": f"Story number {i}:"}


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@contextlib.contextmanager
def while_running(engine, monkeypatch, pool: ThreadPoolExecutor, url: str, count: int, max_tokens: int):
    """Start `count` innocent requests and hold the engine mid-step once all of them are in its batch, until
    the block ends: what the block sends arrives while they run, however fast the engine. Yields their futures."""
    full, go = threading.Event(), threading.Event()
    pick = engine._pick

    def held(*args):
        if len(engine.rows) >= count:
            full.set()
            go.wait(180)
        return pick(*args)

    monkeypatch.setattr(engine, "_pick", held)
    futures = [pool.submit(send, url, *innocent(i, max_tokens)) for i in range(count)]
    try:
        assert full.wait(180)  # generous: a loaded machine admits the innocents slowly
        yield futures
    finally:
        go.set()


def ended_by_length(result: tuple[int, list[dict]]) -> bool:
    code, payloads = result
    return code == 200 and set(finish_reasons(payloads)) == {"length"} and not any("error" in p for p in payloads)


def assert_idle(url: str) -> None:
    wait_until_idle(url)
    m = read_metrics(url)
    assert [m[f"kvshrink_{key}"] for key in ("running_requests", "queued_requests", "live_kv_tokens", "allocated_kv_bytes")] == [0] * 4


POISONS = [({"temperature": float("nan")}, "temperature"), ({"temperature": "nan"}, "temperature"), ({"stop": [123]}, "stop[0]"),
           ({"stop": [["a"]]}, "stop[0]"), ({"top_p": float("nan")}, "top_p"), ({"n": 1.5}, "n"), ({"seed": 1.5}, "seed")]


def test_poisoned_requests_are_refused_while_others_run(serve, monkeypatch, one_thread):
    """Each of these once failed inside the batched step, which ended every request beside it with a 500."""
    engine, url = serve(model="tiny")
    prompts = [("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]
    with ThreadPoolExecutor(4) as pool:
        with while_running(engine, monkeypatch, pool, url, 4, max_tokens=8) as running:
            answers = [(param, send(url, path, {**prompt, "max_tokens": 3, **poison})) for poison, param in POISONS for path, prompt in prompts]
        results = [f.result() for f in running]
    for param, (code, (body,)) in answers:
        assert code == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param, body
        assert body["error"]["message"].startswith(f"{param}: Input should be")  # the field and what it should be
    assert len(answers) == 14 and all(map(ended_by_length, results))
    code, (body,) = send(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 10**12})
    assert code == 400 and "context of 4096 tokens" in body["error"]["message"]  # huge values: refused, naming the limit
    assert_idle(url)


def test_a_request_failing_inside_the_step_ends_alone(serve, monkeypatch, one_thread):
    """Requests that fail while their prompt is read, at their first token, or mid-stream (with a request
    decoding after them in the batch) end with their error; every other request finishes."""
    from kvshrink.errors import KVShrinkError

    engine, url = serve(model="tiny")
    doomed = engine.tokenizer("w7 w7 w7")["input_ids"]
    prefill_piece, pick = engine._prefill_piece, engine._pick

    def failing_prefill(cache, ids):
        if ids == doomed:
            raise RuntimeError("injected prefill failure")
        return prefill_piece(cache, ids)

    def failing_pick(logits, r, s):
        if r.params.seed == 100:
            raise KVShrinkError("injected refusal")
        if r.params.seed == 101 and len(s.tokens) == 2:
            raise RuntimeError("injected sampling failure")
        return pick(logits, r, s)

    monkeypatch.setattr(engine, "_prefill_piece", failing_prefill)
    monkeypatch.setattr(engine, "_pick", failing_pick)
    sampled = {"max_tokens": 8, "temperature": 0.8, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        with while_running(engine, monkeypatch, pool, url, 4, max_tokens=12) as running:  # they outlast the failures
            failing = []
            for path, body in [("/v1/completions", {"prompt": "w7 w7 w7", **sampled}),
                               ("/v1/completions", {"prompt": "Refused at its first token", "seed": 100, **sampled}),
                               ("/v1/completions", {"prompt": "Failing mid-stream", "seed": 101, "n": 2, "stream": True, **sampled}),
                               innocent(4, max_tokens=4)]:  # queued last: its rows come after the mid-stream failure's
                failing.append(pool.submit(send, url, path, body))
                wait_for(lambda: len(engine.waiting) == len(failing))
        running.append(failing.pop())
        (read_code, (read_body,)), (first_code, (first_body,)), (mid_code, mid_events) = [f.result() for f in failing]
        results = [f.result() for f in running]
    assert read_code == 500 and read_body["error"]["type"] == "server_error" and "injected prefill failure" in read_body["error"]["message"]
    assert first_code == 400 and first_body["error"]["type"] == "invalid_request_error" and "injected refusal" in first_body["error"]["message"]
    (mid_error,) = [e["error"] for e in mid_events if "error" in e]
    assert mid_code == 200 and finish_reasons(mid_events) == ["error", "error"]
    assert mid_error["code"] == 500 and "injected sampling failure" in mid_error["message"]
    assert len(results) == 5 and all(map(ended_by_length, results)), [finish_reasons(p) for _, p in results]
    assert_idle(url)


VALID = [("/v1/completions", {"model": "tiny", "prompt": "Count: one, two,", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9,
                              "stop": ["\n\n"], "seed": 3, "n": 2, "stream": False, "ignore_eos": False}),
         ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                                                    {"role": "user", "content": "Hi"}],
                                   "max_tokens": 3, "temperature": 0, "stop": "!", "stream": True, "vote": False})]
BAD_VALUES = [None, True, False, 0, -1, 1.5, -2.5, 10**12, 10**9, -10**12, 2**64, float("nan"), float("inf"), -float("inf"), "nan",
              "", "x", "\ud800", [], [1], [["a"]], ["a", 2], {}, {"a": 1}]
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "ignore_eos", "vote",
          "task", "logprobs", "user", "echo"]


def mutate(rng: random.Random, body: dict) -> bytes:
    """A valid body broken two to four ways (a field set to a bad value, removed or added, a message's field
    or a stop string set to one), then sometimes its bytes made non-UTF-8 or cut short, or the body made a
    JSON value other than an object."""
    body = copy.deepcopy(body)
    for _ in range(rng.randint(2, 4)):
        how = rng.randrange(3)
        if how == 0:
            body[rng.choice(FIELDS)] = rng.choice(BAD_VALUES)
        elif how == 1 and body:
            del body[rng.choice(list(body))]
        elif isinstance(body.get("messages"), list) and body["messages"] and isinstance(body["messages"][0], dict):
            body["messages"][0][rng.choice(["role", "content", "name"])] = rng.choice(BAD_VALUES)
        else:
            body["stop"] = [rng.choice(BAD_VALUES)]
    data = json.dumps(body if rng.random() < 0.9 else rng.choice([[body], "body", 7, None])).encode()  # NaN as Python writes it
    how = rng.randrange(10)
    if how == 0:
        at = rng.randrange(len(data))
        return data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]) + data[at:]
    if how == 1:
        return data[:rng.randrange(len(data))]
    return data


def test_fuzzed_requests_get_json_answers_and_harm_no_one(serve, one_thread):
    """200 random corruptions of valid bodies, sent while innocent requests run: each gets a JSON 4xx or a
    200, every innocent request finishes, and the server ends idle."""
    _, url = serve(model="tiny")
    rng = random.Random(29)
    mutations = [(path, mutate(rng, body)) for path, body in (rng.choice(VALID) for _ in range(200))]
    fuzzed = threading.Event()

    def innocent_client(i: int) -> list:
        """One innocent request after another until the fuzzing is over."""
        results = []
        while not (fuzzed.is_set() and results):
            results.append(send(url, *innocent(i + 10 * len(results), max_tokens=8)))
        return results

    with ThreadPoolExecutor(4) as clients, ThreadPoolExecutor(6) as fuzzers:
        running = [clients.submit(innocent_client, i) for i in range(4)]
        answers = list(fuzzers.map(lambda m: send(url, *m), mutations))
        fuzzed.set()
        results = [r for f in running for r in f.result()]
    for (path, data), (code, payloads) in zip(mutations, answers):
        assert code == 200 or 400 <= code < 500, (path, data, code, payloads)
        if code == 200:
            assert "error" not in finish_reasons(payloads) and not any("error" in p for p in payloads), (path, data, payloads)
        else:
            assert payloads[0]["error"]["type"] in ("invalid_request_error", "model_not_found") and payloads[0]["error"]["message"]
    codes = [code for code, _ in answers]
    assert codes.count(200) >= 10 and sum(400 <= c < 500 for c in codes) >= 100  # both paths were exercised
    assert len(results) >= 8 and all(map(ended_by_length, results))
    assert_idle(url)


def test_scheduler_reserves_what_a_batch_will_allocate():
    """Allocations counted by hand, in bytes: a request keeps its window whole and the rest compressed (rounded
    up); every row's slots are as long as the longest request's kept tokens, rounded up to the chunk; a paged
    cache's keys and values follow each request's own kept tokens, rounded up to blocks; plus each row's own
    bytes and a prefill chunk of headroom."""
    from kvshrink.accounting import Footprint
    from kvshrink.errors import KVShrinkError
    from kvshrink.serve.scheduler import Scheduler

    contiguous = Scheduler(budget=0, max_batch=4, cost=Footprint(slot=50, row=3), expected_cr=4.0, window=8, headroom=5, chunk=16)
    assert contiguous.kept(40, 8) == 18 and contiguous.row_slots(40, 8) == 32  # 8 + 40 / 4 = 18 -> 32
    assert contiguous.row_slots(4, 2) == 16 and contiguous.row_slots(40, 8, cr=1.0) == 48
    assert contiguous.allocated([(40, 8, 2)]) == 2 * (32 * 50 + 3) + 16 * 50  # the headroom: 5 slots -> 16
    assert contiguous.allocated([(40, 8, 2), (4, 2, 1)]) == 3 * (32 * 50 + 3) + 16 * 50  # the short row is as long as the others

    # paged: 10 B a slot of capacity, 2 B a block of capacity (table), 100 B a held token + 20 B of read buffer, blocks of 4
    paged = Footprint(slot=10, row=3, token=100, block=4, table=2, gather=20)
    assert paged.capacity_bytes(32) == 32 * 10 + 8 * 2 and paged.held_bytes(18) == 20 * 120 and paged.held_bytes(0) == 0
    s = Scheduler(budget=15_000, max_batch=4, cost=paged, expected_cr=4.0, window=8, headroom=5, chunk=16)
    headroom = (16 * 10 + 4 * 2) + 8 * 120  # 5 slots -> 16 of capacity, 5 tokens -> 2 blocks
    assert s.allocated([(40, 8, 2)]) == 2 * (336 + 3) + 2 * 20 * 120 + headroom == 6606
    # the short request's keys and values are its own 6 tokens (2 blocks), only its slots are the longest's
    assert s.allocated([(40, 8, 2), (4, 2, 1)]) == 3 * (336 + 3) + 2 * 20 * 120 + 8 * 120 + headroom == 7905
    assert s.achieved_cr([(48, 18.0), (48, 48.0)]) == pytest.approx(80 / 50)  # (40 + 40) seen / (10 + 40) held
    assert s.achieved_cr([(48, 12.0)]) == 4.0  # never above the expected ratio
    assert s.admits([(40, 8, 2)], (40, 8, 2), running_rows=2, cr=4.0)  # 4 x (339 + 2400) + 1128 = 12084 <= 15000
    # at the ratio really reached, 8 + 25 = 33 kept: 48 slots (504 B) and 9 blocks (4320 B) a row
    assert s.allocated([(40, 8, 2), (40, 8, 2)], cr=1.6) == 4 * (504 + 3 + 4320) + headroom == 20436
    assert not s.admits([(40, 8, 2)], (40, 8, 2), running_rows=2, cr=1.6)
    assert not s.admits([], (4, 2, 3), running_rows=2, cr=4.0)  # 2 + 3 rows > max_batch 4
    assert s.admits([(400, 8, 1)], (400, 8, 4), running_rows=0, cr=4.0)  # nothing runs: the head always goes
    assert s.over_budget(15_001, 2) and not s.over_budget(15_001, 1) and not s.over_budget(15_000, 3)
    # 8 + 200 = 208 kept: 208 slots (2184 B) + the row (3 B) + 52 blocks (24960 B) + headroom (1128 B) = 28275 B
    with pytest.raises(KVShrinkError, match=r"needs about 27\.6 KB of KV cache .* more than the server's budget of 14\.6 KB"):
        s.check_fits_alone(800, 8, 1)
    with pytest.raises(KVShrinkError, match="exceed the server's --max-batch 4"):
        s.check_fits_alone(4, 2, 5)


@pytest.mark.parametrize("paged", [False, True])
def test_a_real_batch_allocates_what_the_scheduler_and_its_ledger_say(paged):
    """Rows of 100 and 20 tokens joined in one batch, then decoded one step. Every layer gives both rows 128 slots
    (the longest, rounded up to a chunk); a contiguous cache keeps keys and values in them, a paged one in
    blocks held per row and KV head (with blocks of 32: 4 and 1), read in place (no read buffer). The bytes
    counted by hand are the ledger's, the tensors' own, and what the scheduler reserves for these requests.
    When the long row leaves, the short one's 64 slots and its blocks are all that is left."""
    import torch
    from conftest import tiny_model

    from kvshrink.accounting import Footprint
    from kvshrink.attention import install
    from kvshrink.blocks import DEFAULT_BLOCK
    from kvshrink.cache import DEFAULT_CHUNK, KVCache, footprint, slot_bytes
    from kvshrink.generation import decode_step, prefill_row
    from kvshrink.policies import CachePolicy
    from kvshrink.serve.scheduler import Scheduler

    model = install(tiny_model("llama"))  # fp32, 2 layers, 2 KV heads of 16
    L, H, D, block = 2, 2, 16, DEFAULT_BLOCK
    meta = H * (4 + 1 + 1 + 4)  # a slot over a row's KV heads: fp32 bias, live + flag bools, int32 position
    kv = H * 2 * D * 4  # a token's fp32 key and value over a row's KV heads
    per_row = H * 8 + 8 + 4  # last slot per KV head, real tokens, first position
    if paged:
        cost = Footprint(slot=L * meta, row=L * per_row, token=L * kv, block=block, table=L * H * 4)
    else:
        cost = Footprint(slot=L * (meta + kv), row=L * per_row)
    assert footprint(model, CachePolicy(), paged=paged) == cost and slot_bytes(model) == L * (meta + kv)

    def hand(rows: int, capacity: int, blocks: int) -> int:
        """A layer's bytes: `rows` rows of `capacity` slots, `blocks` blocks held over its rows and KV heads; the
        cache's: L of them."""
        if not paged:
            return L * (rows * capacity * (meta + kv) + rows * per_row)
        table = rows * H * capacity // block * 4
        return L * (rows * capacity * meta + rows * per_row + table + blocks * block * 2 * D * 4)

    batch = KVCache(model, CachePolicy(), paged=paged)
    for n in (100, 20):
        row = KVCache(model, CachePolicy(), paged=paged)
        prefill_row(model, row, list(range(3, 3 + n)))
        batch.append_rows(row)
    long, short = -(-101 // block), -(-21 // block)  # blocks per KV head for 100 and 20 tokens, and one more each
    ledger, held = batch.ledger, H * (long + short)
    assert ledger.rows == [2] * L and ledger.capacity == [2 * DEFAULT_CHUNK] * L and ledger.live_upper == [100] * L
    assert ledger.kv_slots == [held * block if paged else 2 * H * 128] * L
    assert ledger.allocated_slots == ((long + short) * block if paged else 2 * 128)  # per (layer, KV head), over rows
    assert ledger.allocated_bytes == batch.allocated_bytes() == sum(layer.nbytes for layer in batch.layers) == hand(2, 128, held)

    scheduler = Scheduler(budget=1, max_batch=2, cost=cost)
    with torch.no_grad():
        decode_step(model, batch, torch.tensor([5, 6]), None, torch.tensor([100, 20]))  # 101 and 21 tokens: the same blocks
    assert batch.allocated_bytes() == hand(2, 128, held) == scheduler.allocated([(100, 1, 1), (20, 1, 1)])
    assert batch.allocated_bytes() == ledger.allocated_bytes + batch.scratch_bytes
    assert 1 - sum(batch.row_live_tokens()) / ledger.allocated_slots == pytest.approx(1 - 122 / ((long + short) * block if paged else 256))

    batch.take_rows([1])
    assert (ledger.rows, ledger.capacity, ledger.live_upper) == ([1] * L, [DEFAULT_CHUNK] * L, [21] * L)
    assert ledger.allocated_bytes == batch.allocated_bytes() == sum(layer.nbytes for layer in batch.layers) == hand(1, 64, short * H)
    with torch.no_grad():
        decode_step(model, batch, torch.tensor([7]), None, torch.tensor([21]))
    assert batch.allocated_bytes() == hand(1, 64, short * H) == scheduler.allocated([(20, 2, 1)])


def test_a_paged_budget_policy_allocates_far_less_and_within_the_reservation():
    """TOVA at CR 4 keeps a quarter of each row: paged, its rows of 100 and 20 tokens (+ 1 decoded) hold 26 and 6
    (at least 1 block each per KV head) beside 64 slots of metadata: less than half of what a vanilla
    batch allocates, and no more than the scheduler reserves for them (a prefill chunk whole, the rest at CR 4)."""
    import torch
    from conftest import tiny_model

    from kvshrink.attention import install
    from kvshrink.blocks import DEFAULT_BLOCK
    from kvshrink.cache import KVCache, footprint
    from kvshrink.generation import decode_step, prefill_row
    from kvshrink.policies import CachePolicy, for_model
    from kvshrink.serve.scheduler import Scheduler

    model = install(tiny_model("llama"))
    L, H, block = 2, 2, DEFAULT_BLOCK
    tova = for_model(model, "tova", cr=4)
    cost = footprint(model, tova)
    assert cost.slot == L * H * (4 + 1 + 1 + 4 + 4) and cost.token == L * H * 2 * 16 * 4  # its fp32 score beside the metadata
    sizes = {}
    for policy in (CachePolicy(), tova):
        batch = KVCache(model, policy)
        for n in (100, 20):
            row = KVCache(model, policy)
            prefill_row(model, row, list(range(3, 3 + n)))
            row.free_expired()
            batch.append_rows(row)
        with torch.no_grad():
            decode_step(model, batch, torch.tensor([5, 6]), None, torch.tensor([100, 20]))
        sizes[policy.name] = batch.allocated_bytes()
    assert [layer.kv is not None for layer in batch.layers] == [True] * L
    assert batch.live_tokens().tolist() == [[[26, 26], [6, 6]]] * L  # ceil(101 / 4), ceil(21 / 4)
    kv_slots = batch.ledger.kv_slots  # the blocks each layer's storage holds, at least ceil(26 / block) + ceil(6 / block) per KV head
    assert batch.ledger.capacity == [64] * L and all(k >= H * (-(-26 // block) + 1) * block for k in kv_slots)
    per_layer = [2 * 64 * H * 14 + 2 * (H * 8 + 8 + 4) + 2 * H * (64 // block) * 4 + k * 2 * 16 * 4 for k in kv_slots]
    assert sizes["tova"] == sum(per_layer)  # the blocks are read in place: no read buffer
    reserved = Scheduler(budget=1, max_batch=2, cost=cost, expected_cr=4, window=tova.prefill_chunk).allocated([(100, 1, 1), (20, 1, 1)])
    assert sizes["tova"] <= reserved < sizes["none"] / 2
