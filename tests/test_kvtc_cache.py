"""KVTC on real caches: export/restore exactness, the codec in between, the prefix store, prefix reuse."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time

import pytest
import torch


from conftest import left_pad, tiny_model, with_random_dms
from kvshrink.attention import install
from kvshrink.cache import KVCache
from kvshrink.shims import cache_arg
from kvshrink.errors import KVShrinkError
from kvshrink.generation import generate_ids
from kvshrink.kvtc import (Calibration, KVTCFormatError, ModelIdentity, PrefixStore, cache_features, compress, cos_sin,
                           decompress, export_cache, generate_with_prefix_store, pack_cache, prefix, restore_cache,
                           unpack_cache)
from kvshrink.evaluation.kvtc import (_greedy_rows, _middle, _rows, _task_prompts, evaluate, evaluate_model,
                                      reconstruction_error)
from kvshrink.kvtc.fit import calibrate, prompt_state
from kvshrink.generation import prefill_row
from kvshrink.kvtc.store import STALE_SECONDS
from kvshrink.loading import load
from kvshrink.policies import CachePolicy, DMSPolicy, for_model
from kvshrink.tasks import make_problems

DMS_WINDOW = 8
VOCAB = 128
NEAR_LOSSLESS = 0.45  # 2275 bits a token: each of the 64 components its own group, whose fp16 shift is its value


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is as fast, and stays fast on a busy machine


@pytest.fixture(scope="module")
def base():
    return install(tiny_model())  # the same weights as conftest's tiny_model_dir


@pytest.fixture(scope="module")
def dms(base):
    return with_random_dms(base, window=DMS_WINDOW, evict_bias=5.0)  # evicts about a third of the slots


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefilled(model, policy, ids, chunk: int = 64) -> KVCache:
    cache = KVCache(model, policy)
    prefill_row(model, cache, ids, chunk)
    return cache


@pytest.fixture(scope="module")
def calib(base):
    """Fitted on caches of random token sequences, like the prompts below; 64 features a token."""
    rows = []
    for seed in range(6):
        state = export_cache(_prefilled(base, None, _ids(512, 100 + seed)))
        rows.append(cache_features(state.keys, state.values, *cos_sin(base, state.positions)))
    keys, values = (torch.cat(r) for r in zip(*rows))
    return Calibration.fit(ModelIdentity.from_model(base), keys, values, ratios=(NEAR_LOSSLESS, 2.0), dp_rows=2048)


def _max_logit_gap(model, a: KVCache, b: KVCache, continuation: list[int]) -> float:
    """Largest logit difference over teacher-forced decode steps, then one multi-token forward."""
    gaps = [(prefill_row(model, a, [t]) - prefill_row(model, b, [t])).abs().max() for t in continuation]
    gaps.append((prefill_row(model, a, continuation, 16) - prefill_row(model, b, continuation, 16)).abs().max())
    return max(gaps).item()


# -- export / restore -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["none", "dms"])
def test_restore_continues_exactly_like_the_prefilled_cache(kind, base, dms):
    model, policy = (base, CachePolicy()) if kind == "none" else (dms, DMSPolicy(DMS_WINDOW))
    cache = _prefilled(model, policy, _ids(200, 1))
    state = export_cache(cache)
    assert state.keys[0].shape == (1, 2, 200, 16) and torch.equal(state.positions, torch.arange(200))
    if kind == "none":
        assert state.live is None and state.flags is None
    else:  # non-vacuous: some slots evicted, some evictions still pending in the window
        assert not torch.stack(state.live).all() and torch.stack(state.flags).any()
        unflagged = restore_cache(model, policy, *state._replace(flags=None))
    restored = restore_cache(model, policy, *state)
    assert restored.get_seq_length() == 200 and int(restored.layers[0].real) == 200
    continuation = _ids(24, 2)
    assert _max_logit_gap(model, cache, restored, continuation) < 1e-5
    if kind == "dms":  # the pending flags matter: without them the restored cache keeps tokens it should drop
        assert _max_logit_gap(model, _prefilled(model, policy, _ids(200, 1)), unflagged, continuation) > 1e-3


def test_export_of_a_left_padded_finished_row(base):
    """A row of a padded batch that has finished (its last step is padding) comes out at positions
    0..T-1, its real tokens only, and continues like that prompt alone."""
    prompts = [_ids(90, 3), _ids(70, 4)]
    ids, mask = left_pad(prompts)
    batch = KVCache(base)
    with torch.no_grad():
        base(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **cache_arg(batch), use_cache=True)
        mask = torch.cat([mask, torch.tensor([[1], [0]])], 1)  # row 1 is done: its next step is padding
        base(torch.tensor([[5], [0]]), attention_mask=mask, position_ids=torch.tensor([[90], [70]]), **cache_arg(batch))
    state = export_cache(batch, row=1)
    assert len(state.positions) == 70 and state.live is None
    assert _max_logit_gap(base, _prefilled(base, None, prompts[1]), restore_cache(base, None, *state), _ids(8, 5)) < 1e-5


def test_restore_refuses_policies_with_per_token_state(base):
    state = export_cache(_prefilled(base, None, _ids(40, 6)))
    for name in ("tova", "h2o", "quest"):
        with pytest.raises(KVShrinkError, match="per-token state"):
            restore_cache(base, for_model(base, name, cr=4), *state)


# -- through the codec ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["none", "dms"])
def test_restore_through_the_codec_is_close(kind, base, dms, calib):
    model, policy = (base, CachePolicy()) if kind == "none" else (dms, DMSPolicy(DMS_WINDOW))
    ids = _ids(400, 7)  # 4 sinks, 268 compressed, 128 in the window
    cache = _prefilled(model, policy, ids)
    state = export_cache(cache)
    data = pack_cache(state, model, calib, 2, policy)
    back = unpack_cache(data, model, calib, policy)
    assert (back.live is None) == (state.live is None) and (back.flags is None) == (state.flags is None)
    if kind == "dms":
        assert all(torch.equal(a, b) for a, b in zip(back.live + back.flags, state.live + state.flags))
        with pytest.raises(KVTCFormatError, match="another cache policy"):
            unpack_cache(data, model, calib, CachePolicy())
    scale = prefill_row(model, _prefilled(model, policy, ids), _ids(1, 8)).abs().max().item()
    gap = _max_logit_gap(model, cache, restore_cache(model, policy, *back), _ids(16, 8))
    assert 0 < gap < 0.05 * scale


def test_every_flipped_bit_of_a_packed_dms_cache_is_refused(dms, calib):
    """The head, the policy tag, the blob and the pending DMS flags are all under the checksum: every single
    bit flipped in a packed DMS cache is refused (or would have to decode to the very same cache)."""
    policy = DMSPolicy(DMS_WINDOW)
    state = export_cache(_prefilled(dms, policy, _ids(160, 9)))  # 4 sinks, a middle of 28 tokens, 128 in the window
    assert state.flags is not None and torch.stack(state.flags).any()
    data = pack_cache(state, dms, calib, 2, policy)
    clean = unpack_cache(data, dms, calib, policy)
    flipped, refused, same = bytearray(data), 0, 0
    for i in range(8 * len(data)):
        flipped[i // 8] ^= 1 << i % 8
        try:
            back = unpack_cache(bytes(flipped), dms, calib, policy)
        except KVTCFormatError:
            refused += 1
        else:
            assert all(torch.equal(a, b) for a, b in zip(back.keys + back.live + back.flags, clean.keys + clean.live + clean.flags)), i
            same += 1
        flipped[i // 8] ^= 1 << i % 8
    print(f"{8 * len(data)} bit flips of a {len(data)}-byte packed cache: {refused} refused, {same} decoded unchanged")
    assert refused == 8 * len(data)


def test_packed_cache_of_format_version_1_is_refused_with_the_fix(dms, calib):
    """Version 1 (before the checksum over head and flags) began at the head: it is named, with the fix."""
    policy = DMSPolicy(DMS_WINDOW)
    data = pack_cache(export_cache(_prefilled(dms, policy, _ids(40, 9))), dms, calib, 2, policy)
    with pytest.raises(KVTCFormatError, match="format version 1 .* re-pack it with pack_cache"):
        unpack_cache(data[21:], dms, calib, policy)  # the same fields without version 2's frame
    with pytest.raises(KVTCFormatError, match="format version 3; this kvshrink reads version 2: re-pack"):
        unpack_cache(data[:4] + bytes([3]) + data[5:], dms, calib, policy)


# -- the store ------------------------------------------------------------------------------------------------------
def test_store_finds_the_longest_stored_prefix(tmp_path):
    store = PrefixStore(tmp_path, "model-a", max_bytes=1 << 20)
    tokens = list(range(100))
    store.put(tokens[:10], b"ten")
    store.put(tokens[:50], b"fifty")
    store.put([7] * 30, b"other")
    assert store.longest_prefix(tokens) == (50, b"fifty")
    assert store.longest_prefix(tokens[:49]) == (10, b"ten")
    assert store.longest_prefix(tokens[:9]) is None and store.longest_prefix([9, 9]) is None
    assert PrefixStore(tmp_path, "model-b", max_bytes=1 << 20).longest_prefix(tokens) is None  # keyed by model
    store.put(tokens[:50], b"replaced")
    assert store.longest_prefix(tokens) == (50, b"replaced")
    store.remove(tokens[:50])
    assert store.longest_prefix(tokens) == (10, b"ten")


def test_store_evicts_least_recently_used(tmp_path):
    store = PrefixStore(tmp_path, "m", max_bytes=3 * 1100)  # three entries of 1 KB + framing
    for i in range(3):
        store.put([i] * 5, bytes([i]) * 1000)
        time.sleep(0.02)
    assert store.longest_prefix([0] * 5) is not None  # a hit makes entry 0 the most recent
    time.sleep(0.02)
    store.put([3] * 5, b"3" * 1000)
    assert [store.longest_prefix([i] * 5) is not None for i in range(4)] == [True, False, True, True]
    assert not store.put([4] * 5, b"4" * 5000)  # larger than the whole store: not kept
    assert sum(st.st_size for _, st in store.entries()) <= store.max_bytes


def _writer(root: str, worker: int, n: int) -> None:
    store = PrefixStore(root, "m", max_bytes=1 << 30)
    for i in range(n):
        store.put([i, i, i], _payload(i, worker))  # both workers write keys 0..n-1: racing replaces
        store.put([worker, i, 1000], _payload(i, worker))


def _payload(i: int, worker: int) -> bytes:
    return bytes([i, worker]) * (20_000 + 997 * i)


def test_store_with_two_concurrent_writers(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 20)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    store = PrefixStore(tmp_path, "m", max_bytes=1 << 30)
    for i in range(20):
        assert store.longest_prefix([i, i, i])[1] in (_payload(i, 0), _payload(i, 1))
        for w in range(2):
            assert store.longest_prefix([w, i, 1000]) == (3, _payload(i, w))
    assert not any(path.suffix == ".tmp" for path in tmp_path.rglob("*"))


def _endless_writer(root: str) -> None:
    store = PrefixStore(root, "m", max_bytes=1 << 30)
    for i in range(10**6):
        store.put([1, 2, 3, i % 7], bytes([i % 7]) * 4_000_000)


def test_store_survives_a_killed_writer_and_damaged_files(tmp_path):
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_endless_writer, args=(str(tmp_path),))
    proc.start()
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    store = PrefixStore(tmp_path, "m", max_bytes=1 << 30)
    for i in range(7):  # whatever the kill interrupted, every entry found is whole
        hit = store.longest_prefix([1, 2, 3, i])
        assert hit is None or hit == (4, bytes([i]) * 4_000_000)

    tokens = list(range(20))
    store.put(tokens[:5], b"short")
    store.put(tokens[:10], b"long" * 100)
    (entry,) = [path for path, _ in store.entries() if path.parent.name == "10"]
    entry.write_bytes(entry.read_bytes()[:-7])  # a file cut short (a crash before the data reached the disk)
    stale = tmp_path / "10" / f".{entry.stem}.999.dead.tmp"  # a killed writer's leftover
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 2 * STALE_SECONDS,) * 2)
    fresh = tmp_path / "5" / ".x.998.live.tmp"  # another writer's file in progress: left alone
    fresh.write_bytes(b"partial")
    assert store.longest_prefix(tokens) == (5, b"short")  # the damaged entry is skipped...
    assert not entry.exists()  # ...and deleted
    store.put([5], b"x")  # every write sweeps stale temporary files
    assert not stale.exists() and fresh.exists()


# -- prefix reuse ---------------------------------------------------------------------------------------------------
def _words(ids: list[int]) -> str:
    return " ".join(f"w{i - 4}" for i in ids)  # conftest's word-level tokenizer: w<k> is id k + 4


def _prompts(tokenizer) -> tuple[list[str], list[list[int]]]:
    shots = _ids(300, 9)  # a few-shot beginning shared by three prompts
    prompts = [_words(shots + _ids(20, 10 + i)) for i in range(3)]
    prompts.append(prompts[0] + " w7")  # the next turn of the first conversation
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    assert len({ids[300] for ids in encoded[:3]}) == 3  # the prompts part right after the shots
    return prompts, encoded


@pytest.mark.parametrize("kind", ["none", "dms"])
def test_prefix_reuse_gives_the_same_tokens_as_plain_generation(kind, tiny_model_dir, calib, tmp_path, monkeypatch):
    """With the codec swapped for a lossless stand-in, reusing prefixes is exact: the same greedy tokens
    as prefilling every prompt in full (for DMS too: evictions and pending flags come back as they were)."""
    model, tokenizer = load(tiny_model_dir, device="cpu")
    if kind == "dms":
        model = with_random_dms(model, window=DMS_WINDOW, evict_bias=5.0)
    policy = CachePolicy() if kind == "none" else DMSPolicy(DMS_WINDOW)
    prompts, encoded = _prompts(tokenizer)
    packed = []
    monkeypatch.setattr(prefix, "pack_cache", lambda state, *args: packed.append(state) or pickle.dumps(state))
    monkeypatch.setattr(prefix, "unpack_cache", lambda data, *args: pickle.loads(data))
    store = PrefixStore(tmp_path, ModelIdentity.from_model(model), max_bytes=1 << 26)
    out = generate_with_prefix_store(model, tokenizer, prompts, store, calib, NEAR_LOSSLESS, max_new_tokens=12)
    assert out.stats["policy"] == kind
    assert all((s.live is None and s.flags is None) == (kind == "none") for s in packed)  # DMS: evicted and pending
    assert out.tokens == [generate_ids(model, [ids], policy, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id)[0][0]
                          for ids in encoded]
    # prompt 0 stores the shots and its prefix; 1 and 2 restore the shots and store their prefixes;
    # 3 restores prompt 0's prefix and stores its own
    assert out.stats["prefix_tokens_reused"] == 300 + 300 + len(encoded[0]) - 1
    assert out.stats["prefixes_stored"] == 5 and out.stats["prefix_hits"] == 3
    again = generate_with_prefix_store(model, tokenizer, prompts[1], store, calib, NEAR_LOSSLESS, max_new_tokens=12)
    assert again.tokens == out.tokens[1:2] and again.stats["prefix_tokens_reused"] == len(encoded[1]) - 1


def test_prefix_reuse_through_the_codec_stays_greedy(tiny_model_dir, calib, tmp_path):
    """Through the real codec at a near-lossless ratio, every token is the plain model's greedy choice or
    within a hair of it: the sinks' fp8 (2% error) moves this model's logits by ~0.01, and a random
    model has near-ties that such a nudge may flip."""
    model, tokenizer = load(tiny_model_dir, device="cpu")
    prompts, encoded = _prompts(tokenizer)
    store = PrefixStore(tmp_path, ModelIdentity.from_model(model), max_bytes=1 << 26)
    out = generate_with_prefix_store(model, tokenizer, prompts, store, calib, NEAR_LOSSLESS, max_new_tokens=12)
    assert out.stats["prefix_hits"] == 3
    for ids, tokens in zip(encoded, out.tokens):
        cache = _prefilled(model, None, ids[:-1])
        for fed, chosen in zip([ids[-1], *tokens], tokens):  # the plain model's logits along the output
            logits = prefill_row(model, cache, [fed])
            assert logits[chosen] >= logits.max() - 0.05


def test_stale_entry_is_recomputed(tiny_model_dir, calib, tmp_path):
    """An entry written under another policy (same model weights) is dropped and replaced, never misread."""
    model, tokenizer = load(tiny_model_dir, device="cpu")
    store = PrefixStore(tmp_path, ModelIdentity.from_model(model), max_bytes=1 << 26)
    prompt = _words(_ids(150, 11))
    generate_with_prefix_store(model, tokenizer, prompt, store, calib, 2, policy=for_model(model, "window", cr=2), max_new_tokens=2)
    out = generate_with_prefix_store(model, tokenizer, prompt, store, calib, 2, max_new_tokens=4)
    assert out.stats["prefix_tokens_reused"] == 0 and out.stats["prefixes_stored"] == 1
    ids = tokenizer(prompt)["input_ids"]
    assert out.tokens == generate_ids(model, [ids], CachePolicy(), max_new_tokens=4, eos_token_id=tokenizer.eos_token_id)[0]


# -- the CLI's functions, smoke-tested on the tiny model ------------------------------------------------------------
def test_calibrate_and_evaluate_smoke(tiny_model_dir, tmp_path):
    path = calibrate(tiny_model_dir, tmp_path / "calib.safetensors", tokens=1500, ratios=(4,), seq_len=256, dp_rows=512)
    report = evaluate(tiny_model_dir, path, ratios=(4,), task="vt", problems=2, seed=0, device="cpu", max_new_tokens=4)
    methods = report["methods"]
    assert set(methods) == {"vanilla", "int4", "int2", "kvtc4", "tova4"}
    assert all(0 <= m["accuracy"] <= 1 for m in methods.values())
    assert methods["vanilla"]["ratio"] == 1
    assert methods["int4"]["middle_ratio"] == pytest.approx(16 * 16 / (4 * 16 + 32))  # head_dim 16
    assert methods["int2"]["middle_ratio"] == pytest.approx(16 * 16 / (2 * 16 + 32))
    assert methods["kvtc4"]["middle_ratio"] > 3 and methods["kvtc4"]["compress_mb_s"] > 0
    assert methods["tova4"]["compression_ratio"] > 1
    assert all(len(m["correct"]) == 2 for m in methods.values())


@pytest.mark.parametrize("dms", [False, True])
def test_eval_decodes_each_method_as_a_row_like_plain_generation(tiny_model_dir, dms):
    """The eval restores one cache per method as rows of one batch and decodes them together: each row
    writes what plain greedy generation from the prompt writes (vanilla, and DMS with its pending flags)."""
    model, _ = load(tiny_model_dir, device="cpu")
    if dms:
        model = with_random_dms(model, window=DMS_WINDOW, evict_bias=5.0)
    policy = DMSPolicy(window=DMS_WINDOW) if dms else CachePolicy()
    ids = _ids(60, 5)
    state = prompt_state(model, ids[:-1], policy)
    assert (state.live is not None) == dms
    cache = restore_cache(model, policy, *_rows([state, state, state]))
    expected = generate_ids(model, [ids], policy, max_new_tokens=7)[0][0]
    assert _greedy_rows(model, cache, ids[-1], 7, eos=None) == [expected] * 3


def test_evaluate_stores_a_dms_cache_against_vanilla_bytes(tiny_model_dir, tmp_path):
    """On a DMS model the stored cache is DMS's own (evicted slots not stored): its ratio against the vanilla
    cache is above 1 and KVTC multiplies it; int and TOVA baselines only make sense on a vanilla cache."""
    path = calibrate(tiny_model_dir, tmp_path / "calib.safetensors", tokens=1500, ratios=(4,), seq_len=256, dp_rows=512)
    model, tokenizer = load(tiny_model_dir, device="cpu")
    dms = with_random_dms(model, window=DMS_WINDOW, evict_bias=5.0)
    calib = Calibration.load(path, expect=ModelIdentity.from_model(dms))
    report = evaluate_model(dms, tokenizer, calib, (4,), "vt", 2, first=3, max_new_tokens=4)
    methods = report["methods"]
    assert set(methods) == {"dms", "kvtc4"} and report["first"] == 3
    assert methods["dms"]["ratio"] > 1.2  # about a third of the slots evicted
    assert methods["kvtc4"]["ratio"] > 2 * methods["dms"]["ratio"]


def test_reconstruction_error_is_the_relative_error_of_the_middle(tiny_model_dir, calib):
    """One prompt: the pooled relative error equals ||X - X^||_F / ||X||_F over the middle tokens of every
    layer, computed here from the restored cache; the near-lossless plan is far closer than 2x."""
    model, tokenizer = load(tiny_model_dir, device="cpu")
    errors = reconstruction_error(model, tokenizer, calib, (NEAR_LOSSLESS, 2.0), "vt", 1)
    ids = _task_prompts(tokenizer, "vt", make_problems("vt", 1, seed=0), 0, 0)[0]
    state = prompt_state(model, ids[:-1])
    start, end = _middle(len(state.positions))
    assert end - start > 100
    cos, sin = cos_sin(model, state.positions)
    keys, values, _ = decompress(compress(state.keys, state.values, calib, 2.0, cos, sin), calib, cos, sin)
    for name, ref, out in (("keys", state.keys, keys), ("values", state.values, values)):
        a = torch.cat([x[:, :, start:end].flatten() for x in ref]).double()
        b = torch.cat([x[:, :, start:end].flatten() for x in out]).double()
        assert errors["kvtc2"][name] == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-6)
        assert errors[f"kvtc{NEAR_LOSSLESS:g}"][name] < errors["kvtc2"][name] / 3
