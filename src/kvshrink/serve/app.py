"""The OpenAI-compatible HTTP layer over `Engine` (FastAPI): /v1/completions, /v1/chat/completions (with
server-sent-event streaming), /v1/models, /health and Prometheus /metrics.

The engine runs in its own thread; each request gets an asyncio queue that the engine's callbacks
fill (thread-safe), so HTTP handlers only wait. `usage` carries kvshrink's accounting beside OpenAI's
token counts. `vote: true` (with `n` > 1) adds the majority answer: extracted with the task's grader
when `task` is given, else the whole stripped text. `ignore_eos: true` generates `max_tokens` whatever
the model says (for load tests, as vLLM's field of that name).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import KVShrinkError
from ..prompts import chat_prompt
from ..evaluation.voting import majority_vote
from .engine import Engine, SamplingParams


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(engine: Engine, model_name: str) -> FastAPI:
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app):
        worker = threading.Thread(target=engine.run, args=(stop,), daemon=True, name="kvshrink-engine")
        worker.start()
        yield
        stop.set()
        worker.join(timeout=5)

    app = FastAPI(title="kvshrink", lifespan=lifespan)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "kvshrink"}]}

    @app.get("/metrics")
    async def metrics():
        s = engine.stats()
        lines = []
        for key, help_text in (("live_kv_tokens", "live KV cache tokens held, averaged over (layer, KV head)"),
                               ("live_kv_bytes", "bytes of those live tokens' keys and values"),
                               ("budget_kv_tokens", "the admission budget in live KV tokens"),
                               ("running_requests", "admitted requests (decoding, or their prompt being read)"),
                               ("running_sequences", "sequences being decoded"),
                               ("queued_requests", "requests waiting for room"),
                               ("generated_tokens_per_second", "generated tokens per second, last 10 s"),
                               ("generated_tokens_total", "tokens generated since start"),
                               ("compression_ratio", "reads-based compression ratio over everything served")):
            lines += [f"# HELP kvshrink_{key} {help_text}", f"# TYPE kvshrink_{key} gauge", f"kvshrink_{key} {s[key]}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    async def handle(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            return error(400, f"malformed JSON body: {exc}")
        if body.get("model") not in (None, model_name):
            return error(404, f"model {body.get('model')!r} is not served here; this server serves {model_name!r}", "model_not_found")
        try:
            prompt_ids = encode(engine.tokenizer, body, chat)
            stop_words = body.get("stop") or []
            max_tokens = body.get("max_tokens")
            params = SamplingParams(max_tokens=int(16 if max_tokens is None else max_tokens), temperature=float(body.get("temperature", 1.0)),
                                    top_p=float(body.get("top_p", 1.0)), stop=[stop_words] if isinstance(stop_words, str) else list(stop_words),
                                    seed=body.get("seed"), n=int(body.get("n", 1)),
                                    ignore_eos=bool(body.get("ignore_eos", False)))
            task_kind = vote_kind(body)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            req = engine.submit(prompt_ids, params, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        except (KVShrinkError, TypeError, ValueError) as exc:
            return error(400, str(exc))
        if body.get("stream"):
            return StreamingResponse(stream(req, queue, chat), media_type="text/event-stream")
        try:
            while not req.done:
                await queue.get()
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        if req.error:
            return error(500, f"generation failed: {req.error}", "server_error")
        return response(req, chat, task_kind if body.get("vote") else None)

    def base(req, chat: bool) -> dict:
        return {"id": req.id, "object": "chat.completion" if chat else "text_completion", "created": int(req.created), "model": model_name}

    def usage(req) -> dict:
        n_gen = sum(len(s.tokens) for s in req.sequences)
        reads = sum(s.reads for s in req.sequences)
        P = len(req.prompt_ids)
        vanilla = sum(len(s.tokens) * P + len(s.tokens) * (len(s.tokens) - 1) / 2 for s in req.sequences)
        return {"prompt_tokens": P, "completion_tokens": n_gen, "total_tokens": P + n_gen, "kv_reads": reads,
                "peak_kv_tokens": max((s.peak_tokens for s in req.sequences), default=0.0),
                "compression_ratio": vanilla / reads if reads else 1.0}

    def response(req, chat: bool, vote) -> dict:
        choices = []
        for s in req.sequences:
            choice = {"index": s.index, "finish_reason": s.finish_reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": s.text}
            else:
                choice["text"] = s.text
            choices.append(choice)
        out = {**base(req, chat), "choices": choices, "usage": usage(req)}
        if vote is not None:
            answers = [vote(s.text) for s in req.sequences]
            winner = majority_vote(answers)
            out["vote"] = {"answer": sorted(winner) if isinstance(winner, frozenset) else winner,
                           "votes": sum(a == winner for a in answers) if winner is not None else 0, "samples": len(answers)}
        return out

    async def stream(req, queue: asyncio.Queue, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                for s in req.sequences:
                    yield sse({**base(req, chat), "object": kind, "choices": [{"index": s.index, "delta": {"role": "assistant"}, "finish_reason": None}]})
            while True:
                if req.done and queue.empty():
                    break
                event = await queue.get()
                choice = {"index": event["index"], "finish_reason": event["finish_reason"]}
                if chat:
                    choice["delta"] = {"content": event["delta"]} if event["delta"] else {}
                else:
                    choice["text"] = event["delta"]
                yield sse({**base(req, chat), "object": kind, "choices": [choice]})
            yield sse({**base(req, chat), "object": kind, "choices": [], "usage": usage(req)})
            yield "data: [DONE]\n\n"
        finally:
            if not req.done:  # the client went away: free its slots
                engine.cancel(req)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def encode(tokenizer, body: dict, chat: bool) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        return chat_prompt(tokenizer, messages)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    return tokenizer(prompt)["input_ids"]


def vote_kind(body: dict):
    """The answer extractor for `vote`: the task's grader, or the whole stripped text."""
    task = body.get("task")
    if task is None:
        return lambda text: text.strip() or None
    from ..tasks import extract_answer, task_module

    kind = task_module(task).ANSWER_KIND
    return lambda text: extract_answer(text, kind)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_in_thread(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 0):
    """Start the server in a background thread (tests, benchmarks, notebooks): (server, thread, url).
    port 0 picks a free port. Stop it with `server.should_exit = True; thread.join()`."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name), host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    return server, thread, f"http://{host}:{port}"


def read_metrics(url: str) -> dict[str, float]:
    """A running server's /metrics as {name: value}."""
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
