"""Fitting a model's KVTC calibration (`kvshrink kvtc calibrate`): PCA bases and DP bit allocations from the
caches of real text, saved for the codec.

Text seeds: calibration conversations use seeds from `CALIBRATION_SEED`, apart from every evaluated
problem's, so a calibration never holds a problem it is graded on.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ..cache import KVCache
from ..corpora import pydoc_split
from ..errors import KVShrinkError
from ..generation import prefill_row
from ..loading import load
from ..policies import CachePolicy
from ..prompts import chat_prompt
from ..tasks import TASKS, make_problems
from .cache_io import CacheState, cos_sin, export_cache
from .calibration import Calibration, ModelIdentity
from .codec import SINKS
from .pca import cache_features

CALIBRATION_SEED = 1_000_000


def calibrate(model_name, out_path, tokens: int = 100_000, ratios=(4, 8, 16, 32, 64), device: str = "auto", dtype: str = "auto", *,
              seq_len: int = 1024, rank: int | None = None, dp_rows: int = 4096, seed: int = 0) -> Path:
    """Fit a calibration on `tokens` token positions (sinks left out) and save it to `out_path`.

    Text: solved task problems (as the model sees them in eval, chat template included) alternating with
    chunks of pydoc train text, each at most `seq_len` tokens. Rows fill one preallocated fp32 buffer
    per stream (2 · tokens · L·H·D · 4 bytes), and the DP's rows are a random sample of them."""
    if tokens < dp_rows:
        raise KVShrinkError(f"--tokens must be at least {dp_rows} (got {tokens}); the paper calibrates on ~100K")
    if not Path(out_path).parent.is_dir():
        raise KVShrinkError(f"--out {out_path}: folder {Path(out_path).parent} does not exist; create it first")
    model, tokenizer = load(model_name, device=device, dtype=dtype)
    identity = ModelIdentity.from_model(model)
    rows = torch.empty(2, tokens, identity.features)  # key features, value features
    filled = 0
    for ids in _calibration_sequences(tokenizer, seq_len):
        if len(ids) <= SINKS:
            continue
        state = prompt_state(model, ids)
        kf, vf = cache_features([k.cpu() for k in state.keys], [v.cpu() for v in state.values],
                                *cos_sin(model, state.positions), sinks=SINKS)  # (T - sinks, p) each
        take = min(len(kf), tokens - filled)
        rows[0, filled:filled + take], rows[1, filled:filled + take] = kf[:take], vf[:take]
        filled += take
        if filled == tokens:
            break
    _sample_to_front(rows, dp_rows, seed)
    calib = Calibration.fit(identity, rows[0], rows[1], ratios=ratios, rank=rank, dp_rows=dp_rows, seed=seed)
    calib.save(out_path)
    return Path(out_path)


def prompt_state(model, ids: list[int], policy: CachePolicy | None = None) -> CacheState:
    """The cache `policy` (default vanilla) leaves after a prefill of `ids`, exported."""
    cache = KVCache(model, policy)
    prefill_row(model, cache, ids)
    return export_cache(cache)


def _calibration_sequences(tokenizer, seq_len: int):
    """Token-id sequences, endless: a solved problem of each task in turn (prompt as eval encodes it, then
    the worked solution), alternating with consecutive `seq_len`-token chunks of pydoc train text while
    it lasts."""
    text = tokenizer(pydoc_split()[0], verbose=False)["input_ids"]  # one long text: no length warning
    chunks = (text[s:s + seq_len] for s in range(0, len(text), seq_len))
    names = sorted(TASKS)
    for i in itertools.count():
        problem = make_problems(names[i % len(names)], 1, seed=CALIBRATION_SEED + i)[0]
        answer = tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
        yield (chat_prompt(tokenizer, problem.prompt) + answer)[:seq_len]
        chunk = next(chunks, None)
        if chunk is not None:
            yield chunk


def _sample_to_front(rows: torch.Tensor, n: int, seed: int) -> None:
    """Move n random rows of rows (2, N, p) to the front, in place (a partial Fisher–Yates shuffle): the
    DP fits on the first rows, which would otherwise all come from the first few sequences."""
    g = torch.Generator().manual_seed(seed)
    N = rows.shape[1]
    for i in range(min(n, N)):
        j = int(torch.randint(i, N, (1,), generator=g))
        rows[:, [i, j]] = rows[:, [j, i]]
