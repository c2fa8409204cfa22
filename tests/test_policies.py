"""Training-free policies (window, TOVA, H2O) against a brute-force reference.

The reference is written separately from the cache: a dense forward of the tiny Llama that never frees
anything, keeps a Python set of kept positions per (layer, sequence, KV head), attends only over those,
and after every forward drops the lowest-scoring kept tokens one by one until the budget ceil(t / CR)
holds, with the policy's rule written out plainly. Teacher-forced through prefill chunks of 16 and
single-token decode steps, batch 2 with left padding: the cache must keep the same sets step by step
and give the same logits.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import left_pad, tiny_model, with_random_dms
from kvshrink.attention import apply_rope, install
from kvshrink.cache import KVCache
from kvshrink.shims import cache_arg
from kvshrink.errors import KVShrinkError
from kvshrink.generation import generate_ids
from kvshrink.policies import BUDGETED, CachePolicy, DMSPolicy, QuestPolicy, WindowPolicy, for_model

CR = 3.0


def reference_keep_score(policy: str, l_state, b: int, h: int, j: int, kept: set, budget: int, first: int) -> float:
    if policy == "window":
        return math.inf if j < first + 4 else float(j)
    if policy == "tova":
        return l_state["score"][b][h][j]
    recent = sorted(kept, reverse=True)[: budget // 2]  # h2o
    return math.inf if j in recent else l_state["score"][b][h][j]


class Reference:
    """Dense forward with explicit kept sets (Llama: norm -> attention -> residual -> norm -> MLP)."""

    def __init__(self, model, policy: str, B: int, T: int):
        cfg = model.config
        self.model, self.policy = model, policy
        self.Hkv, self.G = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        self.D = cfg.hidden_size // cfg.num_attention_heads
        L = cfg.num_hidden_layers
        self.K = [torch.zeros(B, self.Hkv, T, self.D) for _ in range(L)]
        self.V = [torch.zeros(B, self.Hkv, T, self.D) for _ in range(L)]
        self.kept = [[[set() for _ in range(self.Hkv)] for _ in range(B)] for _ in range(L)]
        self.state = [{"score": [[[0.0] * T for _ in range(self.Hkv)] for _ in range(B)]} for _ in range(L)]
        self.quest_reads = [0.0] * B

    @torch.no_grad()
    def forward(self, ids, mask, positions, s: int, e: int):
        m = self.model.model
        x = m.embed_tokens(ids[:, s:e])
        cos, sin = m.rotary_emb(x, positions[:, s:e])
        B, Q = ids.shape[0], e - s
        valid = mask[:, s:e].bool()
        real_upto = mask[:, :e].sum(-1)
        first = [int(mask[b].nonzero()[0]) for b in range(B)]
        for li, layer in enumerate(m.layers):
            attn = layer.self_attn
            hs = layer.input_layernorm(x)
            q = attn.q_proj(hs).view(B, Q, -1, self.D).transpose(1, 2)
            k = attn.k_proj(hs).view(B, Q, -1, self.D).transpose(1, 2)
            v = attn.v_proj(hs).view(B, Q, -1, self.D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.K[li][:, :, s:e], self.V[li][:, :, s:e] = k, v
            out = torch.zeros(B, q.shape[1], Q, self.D)
            weights = torch.zeros(B, self.Hkv, Q, e)
            for b in range(B):
                for h in range(self.Hkv):
                    kept = self.kept[li][b][h]
                    kept |= {s + i for i in range(Q) if valid[b, i]}
                    for i in range(Q):
                        cols = sorted(j for j in kept if j <= s + i) if valid[b, i] else [s + i]
                        cols = cols or [s + i]
                        if self.policy == "quest" and Q == 1 and valid[b, i]:
                            cols = self._quest_pages(li, b, h, q[b, h * self.G:(h + 1) * self.G, i], cols, first[b], int(real_upto[b]))
                        for g in range(self.G):
                            head = h * self.G + g
                            w = torch.softmax(q[b, head, i] @ self.K[li][b, h, cols].T * attn.scaling, -1)
                            out[b, head, i] = w @ self.V[li][b, h, cols]
                            weights[b, h, i, cols] += w / self.G
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, Q, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if self.policy != "quest":
                self._evict(li, weights, valid, s, real_upto, first)
        return self.model.lm_head(m.norm(x))

    def _quest_pages(self, li, b, h, q, cols, first, real):
        """Pages of 16 by position from the first real token; the current page plus the best bounds."""
        pages = {}
        for j in cols:
            pages.setdefault((j - first) // 16, []).append(j)
        keys = self.K[li][b, h]
        bound = {p: float(torch.stack([torch.maximum(qg * keys[js].max(0).values, qg * keys[js].min(0).values).sum()
                                       for qg in q]).mean()) for p, js in pages.items()}
        current = (max(cols) - first) // 16
        n = max(1, math.ceil(real / CR) // 16)
        chosen = [current] + sorted((p for p in pages if p != current), key=lambda p: -bound[p])[: n - 1]
        self.quest_reads[b] += sum(len(pages[p]) for p in chosen) + 2 * len(pages)
        return sorted(j for p in chosen for j in pages[p])

    def _evict(self, li, weights, valid, s, real_upto, first):
        st = self.state[li]["score"]
        B, Hkv, Q, _ = weights.shape
        for b in range(B):
            budget = math.ceil(int(real_upto[b]) / CR)
            for h in range(Hkv):
                kept = self.kept[li][b][h]
                if self.policy == "tova" and valid[b, -1]:
                    for j in kept:
                        st[b][h][j] = float(weights[b, h, -1, j])
                if self.policy == "h2o":
                    for j in kept:
                        st[b][h][j] += sum(float(weights[b, h, i, j]) for i in range(Q) if valid[b, i])
                while len(kept) > budget:
                    kept.remove(min(kept, key=lambda j: reference_keep_score(self.policy, self.state[li], b, h, j, kept, budget, first[b])))


def teacher_forced_batch(seed: int, lengths: tuple[int, int], n_decode: int):
    """Two left-padded random prompts followed by n_decode forced tokens: (ids, mask, prompt width)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths])
    P = ids.shape[1]
    decode = torch.randint(3, 128, (2, n_decode), generator=g)
    return torch.cat([ids, decode], 1), torch.cat([mask, torch.ones(2, n_decode, dtype=torch.long)], 1), P


@pytest.mark.parametrize("policy", ["window", "tova", "h2o"])
def test_budget_policy_matches_brute_force(policy):
    model = install(copy.deepcopy(tiny_model("llama")))
    ids, mask, P = teacher_forced_batch(7, (37, 21), 14)
    T = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model, for_model(model, policy, cr=CR))
    ref = Reference(model, policy, 2, T)
    schedule = [(s, min(P, s + 16)) for s in range(0, P, 16)] + [(t, t + 1) for t in range(P, T)]
    evicted_somewhere = False
    with torch.no_grad():
        for s, e in schedule:
            got = model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e], **cache_arg(cache), use_cache=True).logits
            expected = ref.forward(ids, mask, positions, s, e)
            rows = mask[:, s:e].bool()
            assert (got - expected)[rows].abs().max() < 1e-4, (s, e)
            for li, layer in enumerate(cache.layers):
                for b in range(2):
                    for h in range(ref.Hkv):
                        live = set(layer.pos[b, h][layer.live[b, h]].tolist())
                        assert live == ref.kept[li][b][h], (policy, s, e, li, b, h)
                        assert len(live) <= math.ceil(int(mask[b, :e].sum()) / CR)
                        evicted_somewhere |= len(live) < int(mask[b, :e].sum())
    assert evicted_somewhere


def test_budget_policy_generation_compresses_and_needs_cr():
    model = install(tiny_model("llama"))
    prompt = torch.randint(3, 128, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    for name in ("window", "tova", "h2o"):
        _, stats, _ = generate_ids(model, [prompt], for_model(model, name, cr=4), max_new_tokens=16)
        # the peak is reached inside the last 16-token prefill chunk: 48 / 4 kept + 16 new
        assert stats["compression_ratio"] > 2.5 and stats["peak_kv_tokens"] == 48 / 4 + 16
    with pytest.raises(KVShrinkError, match=r"give cr \(e.g. cr=8\)"):
        for_model(model, "tova")


def test_quest_matches_brute_force():
    """Quest stores everything; each decode query reads the pages the reference picks (same logits),
    and kv_reads add the two summary vectors of every page."""
    model = install(copy.deepcopy(tiny_model("llama")))
    ids, mask, P = teacher_forced_batch(11, (150, 117), 6)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model, for_model(model, "quest", cr=CR))
    ref = Reference(model, "quest", 2, ids.shape[1])
    pairs = model.config.num_hidden_layers * model.config.num_key_value_heads
    with torch.no_grad():
        for s, e in [(0, 64), (64, P)] + [(t, t + 1) for t in range(P, ids.shape[1])]:
            got = model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e], **cache_arg(cache), use_cache=True).logits
            ref.quest_reads = [0.0, 0.0]
            expected = ref.forward(ids, mask, positions, s, e)
            assert (got - expected)[mask[:, s:e].bool()].abs().max() < 1e-4, (s, e)
            if e - s == 1:
                assert cache.accounting.last_reads[:, 0].tolist() == pytest.approx([r / pairs for r in ref.quest_reads])
                assert all(r / pairs < int(mask[b, :e].sum()) for b, r in enumerate(ref.quest_reads))  # reads fewer tokens
    assert int(cache.live_tokens().sum()) == int(mask.sum()) * pairs  # nothing is freed

    # its memory: vanilla's slots plus the max and min key of every page (fp32) and the page table (int32
    # slot of each of a page's 16 tokens), counted in the cache bytes
    vanilla = KVCache(model, for_model(model, "none"))
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, **cache_arg(vanilla), use_cache=True)
    pages = math.ceil(ids.shape[1] / 16)  # the longest row (no padding) has written every position
    D = model.config.hidden_size // model.config.num_attention_heads
    summary_bytes = model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * pages * (2 * D + 16) * 4
    assert vanilla.scratch_bytes == 0  # the read kernel's reused buffer counts too
    assert cache.allocated_bytes() == vanilla.allocated_bytes() + summary_bytes + cache.scratch_bytes


def test_quest_page_table_follows_compaction():
    """A batch row leaves and the cache compacts the survivor's slots (its left padding goes): Quest's
    page table must follow the moved slots, so the survivor decodes exactly as it would alone."""
    model = install(copy.deepcopy(tiny_model("llama")))
    ids, mask, P = teacher_forced_batch(11, (150, 117), 6)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch, alone = KVCache(model, for_model(model, "quest", cr=CR)), KVCache(model, for_model(model, "quest", cr=CR))
    start = P - 117  # row 1's first real token
    with torch.no_grad():
        model(ids[:, :P], attention_mask=mask[:, :P], position_ids=positions[:, :P], **cache_arg(batch), use_cache=True)
        capacity = batch.layers[0].capacity
        batch.take_rows([1])
        model(ids[1:, start:P], position_ids=positions[1:, start:P], **cache_arg(alone), use_cache=True)
        for t in range(P, ids.shape[1]):
            got = model(ids[1:, t:t + 1], attention_mask=mask[1:, :t + 1], position_ids=positions[1:, t:t + 1],
                        **cache_arg(batch), use_cache=True).logits
            expected = model(ids[1:, t:t + 1], position_ids=positions[1:, t:t + 1], **cache_arg(alone), use_cache=True).logits
            assert (got - expected).abs().max() < 1e-4, t
            assert batch.accounting.last_reads.tolist() == alone.accounting.last_reads.tolist()
    assert batch.layers[0].capacity < capacity  # the padding slots really were compacted away


def test_for_model_defaults_and_builds_each_policy():
    vanilla = install(tiny_model("llama"))
    dms = with_random_dms(tiny_model("llama"), window=8)
    assert type(for_model(vanilla)) is CachePolicy and for_model(dms) == DMSPolicy(8)
    assert for_model(dms, "dms-immediate") == DMSPolicy(0)
    for name, cls in BUDGETED.items():
        policy = for_model(vanilla, name, cr=4)
        assert type(policy) is cls and policy.cr == 4 and policy.name == name
    assert for_model(vanilla, "window", cr=4).sinks == WindowPolicy(4).sinks
    given = QuestPolicy(2)
    assert for_model(vanilla, given, cr=8) is given  # a policy comes back as is, whatever else is given
    assert for_model(vanilla, "none", cr=1).describe() == {"policy": "none"}


def test_for_model_overrides_warn_and_refuse_a_disagreeing_cr():
    from kvshrink.attach import attach_dms
    from kvshrink.dms.config import DMSConfig

    dms = attach_dms(tiny_model("llama"), DMSConfig(window=8, target_cr=4.0, sinks=2))
    assert for_model(dms) == DMSPolicy(8, sinks=2, target_cr=4.0)
    with pytest.warns(UserWarning, match="window=16 overrides the trained DMS window 8"):
        assert for_model(dms, window=16).window == 16
    with pytest.warns(UserWarning, match="sinks=0 overrides the trained DMS sinks 2"):
        assert for_model(dms, "dms-immediate", sinks=0) == DMSPolicy(0, sinks=0, target_cr=4.0)
    assert for_model(dms, cr=4).window == 8  # the trained CR may be restated
    with pytest.raises(KVShrinkError, match=r"trained for CR 4; drop cr or pass cr=4$"):
        for_model(dms, cr=8)


@pytest.mark.parametrize("name,options,message", [
    ("tova", {}, r"policy 'tova' works to a token budget: give cr \(e.g. cr=8\)"),
    (None, {"cr": 4}, r"cr=4 needs a policy that compresses"),
    ("none", {"window": 8}, r"window is a DMS setting; policy 'none' has none \(drop window\)"),
    ("h2o", {"cr": 4, "sinks": 2}, r"sinks is a DMS setting; policy 'h2o' has none \(drop sinks\)"),
    ("dms", {}, r"policy 'dms' needs a DMS model"),
    ("dms-immediate", {}, r"policy 'dms-immediate' needs a DMS model"),
    ("magic", {}, r"unknown policy 'magic'"),
    ("tova", {"cr": 0.5}, r"cr must be >= 1 \(got 0.5\); 1 means no compression, e.g. cr=8"),
    (None, {"window": -1}, r"window must be >= 0"),
])
def test_for_model_names_the_parameter_at_fault(name, options, message):
    with pytest.raises(KVShrinkError, match=message):
        for_model(install(tiny_model("llama")), name, **options)


def test_policies_say_what_they_aim_at_and_whether_they_free_memory():
    model = install(tiny_model("llama"))
    assert (CachePolicy().expected_cr, CachePolicy().frees_memory) == (1.0, False)
    for name in ("tova", "h2o", "window"):
        assert (for_model(model, name, cr=4).expected_cr, for_model(model, name, cr=4).frees_memory) == (4, True)
    assert (QuestPolicy(4).expected_cr, QuestPolicy(4).frees_memory) == (4, False)  # selects reads, frees nothing
    assert (DMSPolicy(8, target_cr=4.0).expected_cr, DMSPolicy(8).expected_cr, DMSPolicy(8).frees_memory) == (4.0, None, True)


def test_the_cli_shows_parameters_as_flags():
    from kvshrink.cli import as_flags

    assert as_flags("this DMS model was trained for CR 8; drop cr or pass cr=8") == \
        "this DMS model was trained for CR 8; drop --cr or pass --cr 8"
    assert as_flags("window is a DMS setting; policy 'window' has none (drop window)") == \
        "--window is a DMS setting; policy 'window' has none (drop --window)"
    assert as_flags("--target-cr must be >= 1; sliding-window attention, dms_window_size") == \
        "--target-cr must be >= 1; sliding-window attention, dms_window_size"
