"""`kvshrink kvtc eval`: KVTC's accuracy and speed on a task against baselines at the same ratios (a study;
fitting the calibration it needs is `kvshrink.kvtc.fit`).

Text seeds: evaluated problems use small seeds; few-shot examples seeds from `EXAMPLE_SEED` and calibration
conversations `kvtc.fit.CALIBRATION_SEED`, so neither ever shows the model a problem it is graded on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from ..cache import KVCache
from ..generation import decode_rows, decode_step, generate_ids
from ..kvtc.cache_io import CacheState, cos_sin, restore_cache
from ..kvtc.calibration import Calibration, ModelIdentity
from ..kvtc.codec import SINKS, WINDOW, blob_stats, compress, decompress
from ..kvtc.fit import prompt_state
from ..kvtc.quant import BITS, GROUP_OVERHEAD_BITS, fake_quant
from ..loading import load
from ..policies import for_model
from ..prompts import chat_prompt, pad_token_id
from ..tasks import answer_budget, grade, make_problems

EXAMPLE_SEED = 2_000_000  # few-shot turns: apart from the graded problems' seeds and kvtc.fit's




def evaluate(model_name, calibration_path, ratios, task: str, problems: int, seed: int = 0, *, device: str = "auto",
             dtype: str = "auto", **options) -> dict:
    """`evaluate_model` on a model loaded by name, with its calibration (refused if fitted for another model)."""
    model, tokenizer = load(model_name, device=device, dtype=dtype)
    calib = Calibration.load(calibration_path, expect=ModelIdentity.from_model(model))
    return evaluate_model(model, tokenizer, calib, ratios, task, problems, seed, **options)


def evaluate_model(model, tokenizer, calib: Calibration, ratios, task: str, problems: int, seed: int = 0, *,
                   first: int = 0, prefix_tokens: int = 0, difficulty: int | None = None,
                   max_new_tokens: int | None = None, batch_size: int = 8, tova_ratios=None) -> dict:
    """Greedy accuracy on problems first .. first + problems - 1 of `task` when the prompt's cache goes
    through each method before the answer is generated, with the bytes each method stores.

    The cache is the one the model's own policy leaves (vanilla, or DMS's with its evictions) for the
    prompt minus its last token, which then runs on the restored cache. Methods: `vanilla` (or the
    policy's name: that cache uncompressed); `kvtc<cr>` per ratio; on a vanilla cache also `int4`, `int2`
    (the middle quantized per token, layer and head with an fp16 shift and scale, sinks and window kept)
    and `tova<cr>` per ratio in `tova_ratios` (default: `ratios`; TOVA evicting during prefill and decode,
    reads-based `compression_ratio`).
    `ratio` counts the whole cache, window included, against a vanilla fp16 cache of the same tokens;
    `middle_ratio` only the compressed middle (the paper's headline); KVTC's speeds are fp16-equivalent
    MB per second of compress / decompress; `correct` lists each problem's grade (for paired comparisons).
    prefix_tokens: prepend solved problems up to this many tokens (>= 512 for arith)."""
    policy = for_model(model)
    items = make_problems(task, problems, seed=seed, difficulty=difficulty, first=first)
    prompts = _task_prompts(tokenizer, task, items, prefix_tokens, seed)
    if max_new_tokens is None:
        max_new_tokens = answer_budget(tokenizer, items)
    eos = tokenizer.eos_token_id
    vanilla = policy.name == "none"
    methods = {"vanilla" if vanilla else policy.name: _uncompressed,
               **({"int4": partial(_quantized, kind="int4"), "int2": partial(_quantized, kind="int2")} if vanilla else {}),
               **{f"kvtc{cr:g}": partial(_kvtc, model=model, calib=calib, cr=cr) for cr in ratios}}
    tallies = {name: _Tally() for name in methods}
    start = time.perf_counter()
    for problem, ids in zip(items, prompts):
        state = prompt_state(model, ids[:-1], policy)
        cache = restore_cache(model, policy, *_rows([method(state, tallies[name]) for name, method in methods.items()]))
        for name, tokens in zip(methods, _greedy_rows(model, cache, ids[-1], max_new_tokens, eos)):
            tallies[name].correct.append(grade(problem, tokenizer.decode(tokens, skip_special_tokens=True)))
    report = {name: tally.report() for name, tally in tallies.items()}
    for cr in (ratios if tova_ratios is None else tova_ratios) if vanilla else ():
        report[f"tova{cr:g}"] = _tova(model, tokenizer, items, prompts, cr, max_new_tokens, batch_size)
    return {"task": task, "difficulty": items[0].difficulty, "problems": len(items), "first": first, "seed": seed,
            "policy": policy.describe(), "prompt_tokens": sum(map(len, prompts)) / len(prompts),
            "max_new_tokens": max_new_tokens, "methods": report, "seconds": time.perf_counter() - start}


def reconstruction_error(model, tokenizer, calib: Calibration, ratios, task: str, problems: int, seed: int = 0, *,
                         prefix_tokens: int = 0) -> dict[str, dict[str, float]]:
    """Relative Frobenius error of the compressed middle, keys and values apart, per ratio, pooled over the
    prompt caches of `problems` held-out problems (the same prompts and caches as `evaluate_model`; on a
    DMS model its live slots only): the paper's diagnostic (about 0.16 for keys and 0.31 for values at
    32x on Mistral NeMo 12B)."""
    policy = for_model(model)
    sums = {f"kvtc{cr:g}": torch.zeros(4, dtype=torch.float64) for cr in ratios}  # key err², key norm², value ...
    for ids in _task_prompts(tokenizer, task, make_problems(task, problems, seed=seed), prefix_tokens, seed):
        state = prompt_state(model, ids[:-1], policy)
        start, end = _middle(len(state.positions))
        cos, sin = cos_sin(model, state.positions)
        for cr in ratios:
            blob = compress(state.keys, state.values, calib, cr, cos, sin, live=state.live)
            keys, values, _ = decompress(blob, calib, cos, sin)
            for i, (ref, out) in enumerate(((state.keys, keys), (state.values, values))):
                for layer, (a, b) in enumerate(zip(ref, out)):
                    a, b = a[0, :, start:end].double().cpu(), b[0, :, start:end].double().cpu()  # (H, t, D)
                    if state.live is not None:
                        a, b = (x[state.live[layer][:, start:end].cpu()] for x in (a, b))
                    sums[f"kvtc{cr:g}"][2 * i:2 * i + 2] += torch.stack([(a - b).square().sum(), a.square().sum()])
    return {name: {"keys": float((t[0] / t[1]).sqrt()), "values": float((t[2] / t[3]).sqrt())} for name, t in sums.items()}


# -- what each method does to the stored cache: a state in, the state decoding sees out -------------------------
@dataclass
class _Tally:
    """One method's totals over the problems: bytes against an fp16 cache, whole and middle, and codec time."""

    correct: list[bool] = field(default_factory=list)
    fp16_bytes: int = 0
    fp16_middle_bytes: int = 0
    stored_bytes: int = 0
    stored_middle_bytes: int = 0
    compress_seconds: float = 0.0
    decompress_seconds: float = 0.0

    def count(self, state: CacheState, stored: int, stored_middle: int) -> None:
        start, end = _middle(len(state.positions))
        self.fp16_bytes += _fp16_bytes(state)
        self.fp16_middle_bytes += _fp16_bytes(state, start, end)
        self.stored_bytes += stored
        self.stored_middle_bytes += stored_middle

    def report(self) -> dict:
        """Accuracy and ratios, with the raw totals (so that reports of several runs can be merged)."""
        out = {"accuracy": sum(self.correct) / len(self.correct), "ratio": self.fp16_bytes / self.stored_bytes,
               "middle_ratio": self.fp16_middle_bytes / self.stored_middle_bytes if self.stored_middle_bytes else None,
               **asdict(self)}
        if self.compress_seconds:
            mb = self.fp16_bytes / 1e6
            out.update(compress_mb_s=mb / self.compress_seconds, decompress_mb_s=mb / self.decompress_seconds)
        return out


def _uncompressed(state: CacheState, tally: _Tally) -> CacheState:
    """The cache as stored in fp16: every token of a vanilla cache, the live slots of a DMS one."""
    start, end = _middle(len(state.positions))
    tally.count(state, _fp16_bytes(state, live=state.live), _fp16_bytes(state, start, end, state.live))
    return state


def _quantized(state: CacheState, tally: _Tally, kind: str) -> CacheState:
    """KIVI-style int quantization of the middle, a group (fp16 shift and scale) per (layer, head, token)
    vector; sinks and window stay 16-bit."""
    T = len(state.positions)
    start, end = _middle(T)
    keys, values = ([_quantize_tokens(x, start, end, kind) for x in xs] for xs in (state.keys, state.values))
    _, H, _, D = state.keys[0].shape
    middle = 2 * len(state.keys) * H * (end - start) * (D * BITS[kind] + GROUP_OVERHEAD_BITS) // 8  # K and V
    tally.count(state, _fp16_bytes(state) - _fp16_bytes(state, start, end) + middle, middle)
    return state._replace(keys=keys, values=values)


def _kvtc(state: CacheState, tally: _Tally, model, calib: Calibration, cr: float) -> CacheState:
    """The codec at `cr`; the bytes are the real blob's."""
    cos, sin = cos_sin(model, state.positions)
    clock = time.perf_counter()
    blob = compress(state.keys, state.values, calib, cr, cos, sin, live=state.live)
    tally.compress_seconds += time.perf_counter() - clock
    clock = time.perf_counter()
    keys, values, live = decompress(blob, calib, cos, sin)
    tally.decompress_seconds += time.perf_counter() - clock
    stats = blob_stats(blob)
    tally.count(state, stats["bytes"], stats["middle_bytes"])
    return CacheState(keys, values, live, state.positions, state.flags)


def _rows(states: list[CacheState]) -> CacheState:
    """One B-row state from states of one cache (same positions, live slots and flags), a row each."""
    def stack(per_layer):  # per_layer(state): its tensors, one per layer
        return [torch.cat([x.to(layer[0]) for x in layer]) for layer in zip(*map(per_layer, states))]

    return states[0]._replace(keys=stack(lambda s: s.keys), values=stack(lambda s: s.values))


@torch.no_grad()
def _greedy_rows(model, cache: KVCache, last: int, max_new_tokens: int, eos: int | None) -> list[list[int]]:
    """Greedy answers of every row of a restored cache, each fed the prompt's last token `last`: the rows
    step together (one forward per token for all methods) until each has written eos or max_new_tokens."""
    B, seen, device = cache.batch_size, cache.get_seq_length(), next(model.parameters()).device
    attn, pos = torch.ones(B, seen + 1, dtype=torch.long, device=device), torch.full((B,), seen, device=device)
    logits = decode_step(model, cache, torch.full((B,), last, device=device), attn, pos)
    return decode_rows(model, cache, logits.argmax(-1), attn, pos, max_new_tokens, eos)[0]


def _middle(T: int) -> tuple[int, int]:
    """[start, end) of the tokens KVTC compresses, split as the codec does: [sinks | middle | window]."""
    s = min(SINKS, T)
    return s, T - min(WINDOW, T - s)


def _quantize_tokens(x: torch.Tensor, start: int, end: int, kind: str) -> torch.Tensor:
    """x: (1, Hkv, T, D) -> the same with tokens [start, end) fake-quantized, a group per D-vector."""
    out = x.clone()
    out[:, :, start:end] = fake_quant(x[:, :, start:end].float(), kind).to(x.dtype)
    return out


def _fp16_bytes(state: CacheState, start: int = 0, end: int | None = None, live=None) -> int:
    """Bytes of tokens [start, end) in fp16, K and V; with `live` (per layer (Hkv, T)), only live slots."""
    _, H, T, D = state.keys[0].shape
    end = T if end is None else end
    slots = len(state.keys) * H * (end - start) if live is None else sum(int(m[:, start:end].sum()) for m in live)
    return 2 * slots * D * 2


def _tova(model, tokenizer, items, prompts, cr: float, max_new_tokens: int, batch_size: int) -> dict:
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    correct, reads, vanilla = [], 0.0, 0.0
    for s in range(0, len(items), batch_size):
        tokens, _, per_seq = generate_ids(model, prompts[s:s + batch_size], for_model(model, "tova", cr=cr),
                                          max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        correct += [grade(p, tokenizer.decode(t, skip_special_tokens=True)) for p, t in zip(items[s:s + batch_size], tokens)]
        reads += float(per_seq["kv_reads"].sum())
        vanilla += float(per_seq["vanilla_kv_reads"].sum())
    return {"accuracy": sum(correct) / len(correct), "correct": correct, "compression_ratio": vanilla / reads}


# -- text ---------------------------------------------------------------------------------------------------------




def _task_prompts(tokenizer, task: str, items, prefix_tokens: int, seed: int) -> list[list[int]]:
    """Each problem's prompt ids: the stored prefix's earlier turns (`_few_shot`), then the question."""
    shots = _few_shot(tokenizer, task, prefix_tokens, seed, items[0].difficulty)
    return [chat_prompt(tokenizer, shots + [{"role": "user", "content": p.prompt}]) for p in items]


def _few_shot(tokenizer, task: str, tokens: int, seed: int, difficulty: int) -> list[dict]:
    """Earlier turns of the conversation: solved problems (seeds apart from the graded ones), each a user
    turn and the worked answer, until they fill `tokens` tokens ([] for 0). The stored prefix a chat
    reuses; as turns, not pasted into the question, they stay in the format the model was tuned on."""
    turns: list[dict] = []
    while tokens and (not turns or len(chat_prompt(tokenizer, turns)) < tokens):
        example = make_problems(task, len(turns) // 2 + 1, seed=EXAMPLE_SEED + seed, difficulty=difficulty)[-1]
        turns += [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.solution}]
    return turns

