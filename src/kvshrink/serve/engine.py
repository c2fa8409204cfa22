"""The serving engine: continuous batching over one `KVCache`, admission by the bytes the caches allocate.

One loop (`step`) advances every running sequence by one token in a single forward. Waiting requests
are admitted in FIFO order when the budget has room, one at a time: the admitted request's prompt is
read `prefill_chunk` tokens per step, between the decode steps of the running batch (chunked prefill),
so a long prompt delays the others' next token by one chunk, not by the whole prompt. When its prompt
is read, its rows join the running batch (`KVCache.append_rows`); finished sequences leave at once and
free their memory (`take_rows`). The budget is counted in the bytes the caches allocate
(`KVCache.allocated_bytes`): each layer's slot metadata, rows x its fullest row, and, in the paged caches of
policies that free memory, keys and values in blocks that follow each row's own live tokens; so a DMS-8x
model admits about 8x the sequences. The caches' ledgers give the bytes with no device sync.

Admission reserves the batch's expected allocation (`scheduler.Scheduler`: each request keeps its prompt plus
`max_tokens`, compressed by the policy's ratio beyond the window, or by the ratio the running sequences really
reach if that is lower; slots are sized to the longest request, keys and values to each one's own, plus a
prefill chunk of headroom). The allocation includes the request being read. If it still outgrows the budget
(a sequence compressing worse than expected), the newest request is paused: the one being read stops, or a
running one's rows leave, and it is read again (prompt + what it generated) when there is room. Requests
that could never fit are refused at submission.

A failure one request causes (reading its prompt, sampling its token, matching its stop strings) ends that
request alone, with its error: its rows leave and the batch goes on. Only a failed batched forward, which
no single request can be blamed for, ends every running request.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import KVCache, footprint
from ..errors import KVShrinkError, check_prefill_chunk
from ..generation import decode_step, prefill_row, sample_next
from ..policies import CachePolicy
from ..shapes import check_context
from .detokenizer import Detokenizer
from .scheduler import Scheduler

MAX_N = 64  # samples per request
GREEDY_BELOW = 1e-5  # a lower temperature samples the argmax anyway, and below ~1e-37 logits / temperature overflow


@dataclass
class SamplingParams:
    """What one request asks for, checked again here (the server checks at its edge) because a bad value
    would fail inside the batched step."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # generate max_tokens whatever the model says (load tests; vLLM's extension)

    def __post_init__(self):
        if not whole(self.max_tokens) or self.max_tokens < 1:
            raise KVShrinkError(f"max_tokens must be a whole number >= 1 (got {self.max_tokens!r})")
        if not (finite(self.temperature) and self.temperature >= 0 and finite(self.top_p) and 0 < self.top_p <= 1):
            raise KVShrinkError(f"temperature must be a finite number >= 0 and top_p one in (0, 1] (got {self.temperature!r}, {self.top_p!r})")
        if not all(isinstance(word, str) and word for word in self.stop):
            raise KVShrinkError(f"stop must be a list of non-empty strings (got {self.stop!r})")
        if self.seed is not None and not whole(self.seed):
            raise KVShrinkError(f"seed must be a whole number (got {self.seed!r})")
        if not whole(self.n) or not 1 <= self.n <= MAX_N:
            raise KVShrinkError(f"n must be a whole number in [1, {MAX_N}] (got {self.n!r})")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0


def whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Sequence:
    """One sample of a request: its tokens and its share of the accounting."""

    index: int
    detokenizer: Detokenizer
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    reads: float = 0.0
    peak_tokens: float = 0.0
    generator: torch.Generator | None = None

    @property
    def text(self) -> str:
        return self.detokenizer.text


@dataclass
class Prefill:
    """The admitted request whose prompt is being read, one chunk per engine step. A new request reads its
    prompt once and its n samples copy that row; a paused one re-reads each unfinished sample's prompt +
    generated tokens, one row each. Finished rows wait in `ready` until all of them are read."""

    request: "Request"
    jobs: list[tuple[list[Sequence], list[int]]]  # (samples that share the row, token ids) still to read
    cache: KVCache  # the row being read
    read: int = 0  # tokens of jobs[0] already in `cache`
    ready: list[tuple[KVCache, list[Sequence], torch.Tensor]] = field(default_factory=list)  # (row, samples, last logits)

    def caches(self) -> list[KVCache]:
        return [self.cache] + [c for c, _, _ in self.ready]


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[dict], None]  # called from the engine thread: {"index", "delta", "finish_reason"}
    sequences: list[Sequence] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    cancelled: bool = False
    error: str | None = None  # set when the engine ended this request with an error
    status: int = 500  # the HTTP status of that error: 400 when the request itself was at fault (a KVShrinkError)

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class Engine:
    def __init__(self, model, tokenizer, policy, budget_bytes: int, max_batch: int = 64, expected_cr: float = 1.0,
                 window: int = 0, prefill_chunk: int = 256, paged: bool | None = None):
        """budget_bytes: what the KV caches may allocate (`KVCache.allocated_bytes`, over every cache the engine holds);
        paged: the caches' key/value layout (None: paged when the policy frees memory; `KVCache`)."""
        check_prefill_chunk(prefill_chunk)
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.prefill_chunk = prefill_chunk
        self.paged = paged
        self.cost = footprint(model, policy, paged=paged)  # a sequence's slot, row and held token, over every layer and KV head
        self.vanilla_slot = footprint(model, CachePolicy()).slot  # a token of a vanilla cache: the budget's token unit
        # an evicting policy holds the chunk it reads at once whole until its evictions apply
        self.scheduler = Scheduler(budget_bytes, max_batch, self.cost, expected_cr, window, headroom=policy.prefill_chunk or 0)
        self.device = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id
        self.cache = KVCache(model, policy, paged=paged)
        self.rows: list[tuple[Request, Sequence]] = []  # running, in cache row order
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.ids = itertools.count()
        self.generated_total, self.reads_total, self.vanilla_reads_total = 0, 0.0, 0.0
        self.rate_window: deque[tuple[float, int]] = deque(maxlen=64)  # (time, tokens) per step
        self.admitted: deque[str] = deque(maxlen=4096)  # request ids in admission order (FIFO, checked by tests)
        self.prefill: Prefill | None = None  # admitted, its prompt being read between decode steps
        self._publish()

    # -- what the scheduler reads -------------------------------------------------------------------
    @property
    def budget(self) -> int:
        """Bytes the KV caches may allocate."""
        return self.scheduler.budget

    @property
    def budget_tokens(self) -> float:
        """The budget in tokens of a vanilla cache (keys, values and slot metadata): the memory it is worth."""
        return self.budget / self.vanilla_slot

    def achieved_cr(self) -> float:
        if not self.rows:
            return self.scheduler.expected_cr
        seen = [len(r.prompt_ids) + len(s.tokens) for r, s in self.rows]
        return self.scheduler.achieved_cr(list(zip(seen, self.cache.row_live_tokens())))

    def _caches(self) -> list[KVCache]:
        """The running batch's cache and those of the request being read."""
        return [self.cache] + (self.prefill.caches() if self.prefill else [])

    def live_tokens(self) -> float:
        """Live tokens held, averaged over (layer, KV head) and summed over sequences."""
        return sum(sum(cache.row_live_tokens()) for cache in self._caches())

    def allocated_slots(self) -> float:
        """Key/value slots allocated, in the same unit (per layer and KV head, over sequences): off the caches' ledgers."""
        return sum(cache.ledger.allocated_slots for cache in self._caches())

    def allocated_bytes(self) -> int:
        """Bytes the caches allocate (tensors, blocks, read buffers): off their ledgers, with no device sync."""
        return sum(cache.allocated_bytes() for cache in self._caches())

    def _admitted_requests(self) -> dict[int, Request]:
        requests = {id(r): r for r, _ in self.rows}
        if self.prefill:
            requests[id(self.prefill.request)] = self.prefill.request
        return requests

    # -- API used by the HTTP layer ------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event) -> Request:
        check_context(self.model.config, len(prompt_ids), params.max_tokens)
        self.scheduler.check_fits_alone(len(prompt_ids), params.max_tokens, params.n)
        request = Request(f"cmpl-{next(self.ids)}", list(prompt_ids), params, on_event)
        request.sequences = [Sequence(i, Detokenizer(self.tokenizer, tuple(params.stop)), generator=self._generator(params, i))
                             for i in range(params.n)]
        with self.lock:
            self.waiting.append(request)
            self.lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        with self.lock:
            request.cancelled = True
            self.lock.notify()

    def stats(self) -> dict:
        """The state after the last step (published by the engine thread, so readers never race it)."""
        return {**self.snapshot, "queued_requests": len(self.waiting)}

    def _publish(self) -> None:
        now = time.time()
        recent = [(t, n) for t, n in self.rate_window if now - t < 10]
        rate = sum(n for _, n in recent[1:]) / max(1e-9, recent[-1][0] - recent[0][0]) if len(recent) > 1 else 0.0
        live, allocated = self.live_tokens(), self.allocated_slots()
        self.snapshot = {"live_kv_tokens": live, "live_kv_bytes": live * self.cost.live_token, "allocated_kv_tokens": allocated,
                         "allocated_kv_bytes": self.allocated_bytes(), "kv_fragmentation": 1 - live / allocated if allocated else 0.0,
                         "budget_kv_bytes": self.budget, "budget_kv_tokens": self.budget_tokens,
                         "running_requests": len(self._admitted_requests()), "running_sequences": len(self.rows),
                         "generated_tokens_per_second": rate, "generated_tokens_total": self.generated_total,
                         "compression_ratio": self.vanilla_reads_total / self.reads_total if self.reads_total else 1.0}

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self.lock:
                while not stop.is_set() and not self.rows and not self.waiting and not self.prefill:
                    self.lock.wait(timeout=0.5)
            if stop.is_set():
                return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a step that failed as a whole must not stop the server
                self._fail_running(exc)

    def step(self) -> None:
        """Drop cancelled work, admit what fits, read one chunk of the admitted prompt, decode one token
        for every running sequence."""
        try:
            self._step()
        finally:
            self._publish()

    def _step(self) -> None:
        with self.lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
        self._leave([i for i, (r, _) in enumerate(self.rows) if r.cancelled])
        if self.prefill and self.prefill.request.cancelled:
            self.prefill = None
        self._admit()
        self._read_chunk()
        self._pause_if_over_budget()
        if not self.rows:
            return
        tokens = torch.tensor([s.tokens[-1] for _, s in self.rows], device=self.device)
        positions = torch.tensor([len(r.prompt_ids) + len(s.tokens) - 1 for r, s in self.rows], device=self.device)
        logits = decode_step(self.model, self.cache, tokens, None, positions)
        self._account(self.cache.accounting.last_reads[:, 0])
        greedy = logits.argmax(-1).tolist()  # one transfer for every greedy row
        for i, (r, s) in enumerate(self.rows):
            self._advance(r, s, lambda: greedy[i] if r.params.temperature == 0 else self._pick(logits[i:i + 1], r, s))
        self._leave([i for i, (_, s) in enumerate(self.rows) if s.finish_reason is not None])

    # -- steps' parts ---------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Admit the queue's head if nothing is being read and the budget has room (FIFO: nobody overtakes it)."""
        with self.lock:
            if self.prefill or not self.waiting:
                return
            r = self.waiting[0]
            admitted = [(len(a.prompt_ids), a.params.max_tokens, len(a.sequences)) for a in self._admitted_requests().values()]
            if not self.scheduler.admits(admitted, (len(r.prompt_ids), r.params.max_tokens, len(r.sequences)), len(self.rows),
                                         self.achieved_cr()):
                return
            self.waiting.popleft()
        if r.sequences[0].tokens:  # paused: each unfinished sample re-reads its prompt + what it generated
            jobs = [([s], r.prompt_ids + s.tokens[:-1]) for s in r.sequences if s.finish_reason is None]
        else:
            jobs = [(r.sequences, r.prompt_ids)]
        self.prefill = Prefill(r, jobs, KVCache(self.model, self.policy, paged=self.paged))

    def _read_chunk(self) -> None:
        """Read the next chunk of the admitted request; when all its rows are read, they join the batch."""
        p = self.prefill
        if p is None:
            return
        samples, ids = p.jobs[0]
        piece = ids[p.read:p.read + self.prefill_chunk]
        try:
            logits = self._prefill_piece(p.cache, piece)
        except Exception as exc:  # noqa: BLE001 - the row being read is this request's alone: the batch goes on
            self._fail(p.request, exc)
            self.prefill = None
            return
        p.read += len(piece)
        if p.read < len(ids):
            return
        p.cache.free_expired()  # a finished row holds no expired tokens, however many samples copy it
        p.ready.append((p.cache, samples, logits[None]))
        p.jobs.pop(0)
        p.cache, p.read = KVCache(self.model, self.policy, paged=self.paged), 0
        if not p.jobs:
            self._join(p)
            self.prefill = None  # after joining: a failure while joining still finds the request here

    def _prefill_piece(self, cache: KVCache, ids: list[int]) -> torch.Tensor:
        """Read `ids` into a one-row cache after what it holds; the last position's logits."""
        return prefill_row(self.model, cache, ids)

    def _join(self, p: Prefill) -> None:
        """The read rows join the batch. A new request's samples share its one row (copied n times) and
        take their first token from the prompt's last position."""
        r = p.request
        for row, samples, logits in p.ready:
            resumed = bool(samples[0].tokens)
            first_reads = float(row.accounting.last_reads[0, -1])
            if len(samples) > 1:
                row.take_rows([0] * len(samples))
            self.cache.append_rows(row)
            self.rows += [(r, s) for s in samples]
            if resumed:
                continue
            self.admitted.append(r.id)
            for s in samples:
                s.reads += first_reads
                self.reads_total += first_reads
                self.vanilla_reads_total += len(r.prompt_ids)
                self._advance(r, s, lambda: self._pick(logits, r, s))
        self._leave([i for i, (_, s) in enumerate(self.rows) if s.finish_reason is not None])

    def _pause_if_over_budget(self) -> None:
        """The allocation outgrew the budget: the newest request (the one being read, else the newest running
        one) stops and waits at the queue's head."""
        while self.scheduler.over_budget(self.allocated_bytes(), len(self._admitted_requests())):
            if self.prefill:
                newest, self.prefill = self.prefill.request, None
            else:
                newest = self.rows[-1][0]
                self._leave([i for i, (r, _) in enumerate(self.rows) if r is newest])
            with self.lock:
                self.waiting.appendleft(newest)

    def _fail_running(self, exc: Exception) -> None:
        """A failure no single request caused (the batched forward): finish every running (and half-admitted)
        request with the error, free the cache, go on serving."""
        for r in self._admitted_requests().values():
            self._fail(r, exc)
        self.rows, self.prefill = [], None
        self._reset_cache()
        self._publish()

    def _fail(self, r: Request, exc: Exception) -> None:
        """End `r`'s unfinished samples with the error; its rows leave with the finished ones."""
        r.error, r.status = f"{type(exc).__name__}: {exc}", 400 if isinstance(exc, KVShrinkError) else 500
        print(f"kvshrink serve: request {r.id} failed: {r.error}", file=sys.stderr, flush=True)
        for s in r.sequences:
            if s.finish_reason is None:
                s.finish_reason = "error"
                r.on_event({"index": s.index, "delta": "", "finish_reason": "error"})

    def _leave(self, indices: list[int]) -> None:
        if not indices:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.cache.take_rows(keep) if keep else self._reset_cache()
        self.rows = [self.rows[i] for i in keep]

    def _reset_cache(self) -> None:
        self.cache = KVCache(self.model, self.policy, paged=self.paged)

    def _account(self, reads: torch.Tensor) -> None:
        for (r, s), row_reads, row_live in zip(self.rows, reads.tolist(), self.cache.row_live_tokens()):
            s.reads += row_reads
            s.peak_tokens = max(s.peak_tokens, row_live)
            self.vanilla_reads_total += len(r.prompt_ids) + len(s.tokens)
        self.reads_total += float(reads.sum())
        self.rate_window.append((time.time(), len(self.rows)))

    def _pick(self, logits: torch.Tensor, r: Request, s: Sequence) -> int:
        return int(sample_next(logits, r.params.temperature, r.params.top_p, s.generator)[0])

    def _advance(self, r: Request, s: Sequence, pick: Callable[[], int]) -> None:
        """Sample and emit `s`'s next token. A failure here is its request's alone (its sampler, its stop
        strings): the request ends with the error and the rest of the batch goes on."""
        if r.error:  # another sample of it failed this step
            return
        try:
            self._emit(r, s, pick())
        except Exception as exc:  # noqa: BLE001
            self._fail(r, exc)

    def _emit(self, r: Request, s: Sequence, token: int) -> None:
        s.tokens.append(token)
        self.generated_total += 1
        ends = "stop" if token == self.eos and not r.params.ignore_eos else "length" if len(s.tokens) >= r.params.max_tokens else None
        delta, stopped = s.detokenizer.push(s.tokens, final=ends is not None)
        s.finish_reason = "stop" if stopped else ends  # only now: a failure above leaves the sample unfinished, and `_fail` tells its client
        r.on_event({"index": s.index, "delta": delta, "finish_reason": s.finish_reason})

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.temperature == 0:
            return None
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, ()))
        return torch.Generator(device=self.device).manual_seed((seed * 1_000_003 + index) % 2**64)  # any integer seeds
