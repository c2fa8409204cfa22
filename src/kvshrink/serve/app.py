"""The OpenAI-compatible HTTP layer over `Engine` (FastAPI): /v1/completions, /v1/chat/completions (with
server-sent-event streaming), /v1/models, /health and Prometheus /metrics.

The engine runs in its own thread; each request gets an asyncio queue that the engine's callbacks
fill (thread-safe), so HTTP handlers only wait. `usage` carries kvshrink's accounting beside OpenAI's
token counts. `vote: true` (with `n` > 1) adds the majority answer: extracted with the task's grader
when `task` is given, else the whole stripped text. `ignore_eos: true` generates `max_tokens` whatever
the model says (for load tests, as vLLM's field of that name).

Each endpoint's body is one pydantic model, typed strictly (no 1.5 for a seed, no "nan" for a
temperature): a bad request is answered 400 with the field it got wrong, before anything reaches the
engine, whose batched step would otherwise fail for every request running beside it.
"""

from __future__ import annotations

import asyncio
import json
import reprlib
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..accounting import vanilla_reads
from ..errors import KVShrinkError
from ..evaluation.voting import majority_vote
from ..prompts import chat_prompt
from .engine import MAX_N, Engine, SamplingParams


def utf8(text: str) -> str:
    """JSON escapes can spell lone surrogates, which the tokenizer cannot read."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate (\\ud800-\\udfff); send valid Unicode") from None
    return text


Unicode = Annotated[str, AfterValidator(utf8)]
Text = Annotated[Unicode, Field(min_length=1)]
# one string or a list of up to 4 (OpenAI's limit: each is sought in the text after every token); null: none
Stop = Annotated[list[Text], BeforeValidator(lambda v: [] if v is None else [v] if isinstance(v, str) else v), Field(max_length=4)]
# one string or a list of one
Prompt = Annotated[Text, BeforeValidator(lambda v: v[0] if isinstance(v, list) and len(v) == 1 else v)]


class Body(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored, as OpenAI clients send some we do not use."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)  # None: 16; the model's context and the KV budget bound it at submission
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: Stop = []
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    ignore_eos: bool = False
    vote: bool = False
    task: str | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=16 if self.max_tokens is None else self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=self.stop, seed=self.seed, n=self.n, ignore_eos=self.ignore_eos)


class CompletionBody(Body):
    prompt: Prompt

    def prompt_ids(self, tokenizer) -> list[int]:
        return tokenizer(self.prompt)["input_ids"]


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Unicode


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)

    def prompt_ids(self, tokenizer) -> list[int]:
        return chat_prompt(tokenizer, [m.model_dump() for m in self.messages])


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def invalid(exc: ValidationError) -> JSONResponse:
    """The first problem, named by its field: `n: Input should be a valid integer (got 1.5)`."""
    problem = exc.errors(include_url=False)[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem["loc"]).lstrip(".")
    got = "" if problem["type"] == "missing" else f" (got {reprlib.repr(problem['input'])})"
    return error(400, f"{param}: {problem['msg'].removeprefix('Value error, ')}{got}", param=param)


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
        for key, help_text in (("live_kv_tokens", "live KV cache tokens held, averaged over (layer, KV head), summed over sequences"),
                               ("live_kv_bytes", "bytes those live tokens need: their keys, values and slot metadata"),
                               ("allocated_kv_tokens", "key/value slots allocated, in that unit: contiguous, each row as long as "
                                                       "its layer's longest; paged, the blocks in storage"),
                               ("allocated_kv_bytes", "bytes the KV caches allocate (keys, values, slot and row metadata, policy "
                                                      "state, block tables, read buffers): what the budget counts"),
                               ("kv_fragmentation", "share of the allocated key/value slots holding no live token: 1 - live / allocated"),
                               ("budget_kv_bytes", "the admission budget: bytes the KV caches may allocate"),
                               ("budget_kv_tokens", "the budget in tokens of a vanilla cache (keys, values, slot metadata)"),
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
        return await handle(request, CompletionBody)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatBody)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        """A bug still answers in OpenAI's error shape (JSON), not as plain text."""
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    async def handle(request: Request, schema: type[Body]):
        try:
            raw = json.loads(await request.body())  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        except (ValueError, RecursionError) as exc:
            return error(400, f"malformed JSON body: {exc}")
        if not isinstance(raw, dict):
            return error(400, f"the body must be a JSON object, not {reprlib.repr(raw)}")
        try:
            body = schema.model_validate(raw)
        except ValidationError as exc:
            return invalid(exc)
        if body.model not in (None, model_name):
            return error(404, f"model {body.model!r} is not served here; this server serves {model_name!r}", "model_not_found", "model")
        chat = schema is ChatBody
        try:
            prompt_ids = body.prompt_ids(engine.tokenizer)
            task_kind = vote_kind(body.task)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            req = engine.submit(prompt_ids, body.sampling(), lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        except KVShrinkError as exc:
            return error(400, str(exc))
        if body.stream:
            return StreamingResponse(stream(req, queue, chat), media_type="text/event-stream")
        try:
            while not req.done:
                await queue.get()
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        if req.error:
            return failed(req)
        return response(req, chat, task_kind if body.vote else None)

    def base(req, chat: bool) -> dict:
        return {"id": req.id, "object": "chat.completion" if chat else "text_completion", "created": int(req.created), "model": model_name}

    def usage(req) -> dict:
        n_gen = sum(len(s.tokens) for s in req.sequences)
        reads = sum(s.reads for s in req.sequences)
        P = len(req.prompt_ids)
        vanilla = sum(vanilla_reads(P, len(s.tokens)) for s in req.sequences)
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
            unfinished = len(req.sequences)
            while unfinished:  # until each sample's last event: `req.done` turns true before the events get here
                event = await queue.get()
                unfinished -= event["finish_reason"] is not None
                choice = {"index": event["index"], "finish_reason": event["finish_reason"]}
                if chat:
                    choice["delta"] = {"content": event["delta"]} if event["delta"] else {}
                else:
                    choice["text"] = event["delta"]
                yield sse({**base(req, chat), "object": kind, "choices": [choice]})
            if req.error:  # the 200 is sent: the error comes as an event, in the error response's shape
                yield f"data: {failed(req).body.decode()}\n\n"
            yield sse({**base(req, chat), "object": kind, "choices": [], "usage": usage(req)})
            yield "data: [DONE]\n\n"
        finally:
            if not req.done:  # the client went away: free its slots
                engine.cancel(req)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def failed(req) -> JSONResponse:
    """The answer to a request the engine ended with an error: 400 if the request was at fault, else 500."""
    return error(req.status, f"generation failed: {req.error}", "invalid_request_error" if req.status < 500 else "server_error")


def vote_kind(task: str | None):
    """The answer extractor for `vote`: the task's grader, or the whole stripped text."""
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
