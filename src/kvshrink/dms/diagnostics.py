"""What a DMS model's eviction decisions look like: the figures of `kvshrink inspect`.

Decisions: eval mode, one teacher-forced forward per sequence (no padding), one logit per (layer, KV head,
position); flag = logit > 0 means "evict". The decision computed at position t+1 marks token t, so token 0's
fate is the decision at position 1 and the last token has none yet: a sequence of T tokens has T - 1
decided tokens per head. Sinks (`DMSConfig.sinks`) are never evicted whatever their flags.

Figures (`decision_figures`, from the logits alone, so that a test can plant them):
- `head_flag_rate` (L x Hkv): the share of decided tokens each (layer, KV head) evicts, sinks counted as
  kept (what the cache does, and how training counts its flag rate); `flag_rate` is their mean and
  `flag_cr` = 1 / (1 - flag_rate), the flag-based compression ratio (null when every token is evicted).
- `token0`: how many heads evict token 0, `raw` (the flag at position 1) and `effective` (after the sinks):
  the median over sequences, the `range` (min, max) and the `per_sequence` counts; `head_rate_raw`
  (L x Hkv) is the share of sequences in which each head's flag evicts token 0, and `heads_raw` lists the
  heads that do so in more than half of them.
- `median_abs_logit` and `reach`: over the learned decisions (those that mark a decided token that is not a
  sink; the others get no gradient), the median |logit| and the expected share of decisions that training
  can still move. Training draws z = (logit + n) / tau with logistic noise n and learns through
  sigmoid(z), whose slope is below 1% of its peak once |z| >= 5; a decision is "within reach of a
  gradient" when |z| < 5, i.e. |logit + n| < `reach_halfwidth` = 5 tau (0.5 at the release's tau 0.1).
  In closed form from the logistic CDF: P(|l + n| < h) = sigmoid(h - l) - sigmoid(-h - l), averaged.
- `buckets`: heads by flag rate, "<.05" / ".05-.5" / ".5-.95" / ">=.95" (lower bounds inclusive);
  `all_keep_heads` (rate < .05) and `window_only_heads` (rate >= .95) as [layer, head] pairs;
  `all_keep_kept_share`: the share of all kept (decided) tokens, over every head, held by all-keep heads.
- `facts` (task prompts only, else null): over the prompt tokens with a learned decision, a token's score is
  its keep probability sigmoid(-logit) averaged over (layer, KV head); `auc` is the ROC AUC (Mann-Whitney,
  ties counted half) that a fact token scores above a filler token, pooled over prompts (0.5: blind to
  content; null without both kinds): does the model as a whole keep facts more? `auc_per_decision` is the
  same over single (layer, KV head, token) decisions, each scored by its own keep probability: how much a
  fact's label tells about one decision, which head-level on/off (all-keep and window-only heads) drags
  towards 0.5. `fact_keep_rate` and `filler_keep_rate` are the shares of (layer, head, token) decisions
  that keep them. Facts are the sentences the answer depends on
  (`kvshrink.tasks.fact_spans`); filler is every other prompt token, instructions and chat template included.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import KVShrinkError
from .config import DMSConfig
from .signals import TrainSignals

BUCKETS = ("<.05", ".05-.5", ".5-.95", ">=.95")
ALL_KEEP, WINDOW_ONLY = 0.05, 0.95  # flag-rate bounds of the first and last buckets
REACH_Z = 5.0  # |z| below which sigmoid(z) still has >= 1% of its peak slope


def decision_figures(logits, sinks: int = 0, tau: float = 0.1, facts=None) -> dict:
    """The figures of the module docstring.

    logits: one (L, Hkv, T) tensor per sequence (or one tensor), the logit computed at each position.
    facts: None, or per sequence a (T,) bool tensor (or None) marking the tokens that belong to a fact.
    """
    seqs = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not seqs:
        raise KVShrinkError("no sequences to inspect")
    if facts is not None and len(facts) != len(seqs):
        raise KVShrinkError(f"{len(facts)} fact masks for {len(seqs)} sequences")
    L, H = seqs[0].shape[:2]
    evicted = torch.zeros(L, H, dtype=torch.float64)  # effective flags, summed over decided tokens
    decided = 0  # decided tokens per head
    learned, t0_raw, t0_eff = [], [], []
    scores, keeps, labels, decisions = [], [], [], []
    for i, lg in enumerate(seqs):
        if lg.dim() != 3 or lg.shape[:2] != (L, H):
            raise KVShrinkError(f"sequence {i}: logits of shape {tuple(lg.shape)}, expected ({L}, {H}, T)")
        T = lg.shape[-1]
        if T < 2:
            raise KVShrinkError(f"sequence {i} has {T} token(s); a decision needs at least 2")
        marks = lg.detach().to("cpu", torch.float64)[..., 1:]  # (L, H, T-1): the decision on tokens 0 .. T-2
        sink = torch.arange(T - 1) < sinks  # (T-1,)
        raw = marks > 0
        eff = raw & ~sink
        evicted += eff.sum(-1)
        decided += T - 1
        learned.append(marks[..., ~sink].reshape(-1))
        t0_raw.append(raw[..., 0])
        t0_eff.append(eff[..., 0])
        if facts is not None and facts[i] is not None:
            label = torch.as_tensor(facts[i], dtype=torch.bool).cpu()
            if label.shape != (T,):
                raise KVShrinkError(f"sequence {i}: fact mask of shape {tuple(label.shape)}, expected ({T},)")
            keep_p = torch.sigmoid(-marks[..., ~sink])  # (L, H, tokens with a learned decision)
            scores.append(keep_p.mean((0, 1)))
            keeps.append((~eff[..., ~sink]).double().mean((0, 1)))
            labels.append(label[:-1][~sink])
            decisions.append(keep_p.reshape(L * H, -1))

    rate = evicted / decided  # (L, H)
    flag_rate = float(rate.mean())
    learned = torch.cat(learned)
    if learned.numel() == 0:
        raise KVShrinkError(f"every decided token is a sink (sinks {sinks}); give longer sequences")
    h = REACH_Z * tau
    reach = float((torch.sigmoid(h - learned) - torch.sigmoid(-h - learned)).mean())
    all_keep, window_only = rate < ALL_KEEP, rate >= WINDOW_ONLY
    kept = decided - evicted
    raw_counts = [int(t.sum()) for t in t0_raw]
    eff_counts = [int(t.sum()) for t in t0_eff]
    head_t0 = torch.stack(t0_raw).double().mean(0)
    return {
        "sequences": len(seqs), "decided_tokens": decided, "layers": L, "kv_heads": H, "sinks": sinks, "tau": tau,
        "flag_rate": flag_rate, "flag_cr": 1.0 / (1.0 - flag_rate) if flag_rate < 1 else None,
        "head_flag_rate": rate.tolist(),
        "median_abs_logit": float(np.median(learned.abs().numpy())),
        "reach": reach, "reach_halfwidth": h,
        "buckets": dict(zip(BUCKETS, [int(all_keep.sum()), int(((rate >= ALL_KEEP) & (rate < 0.5)).sum()),
                                      int(((rate >= 0.5) & (rate < WINDOW_ONLY)).sum()), int(window_only.sum())])),
        "all_keep_heads": _pairs(all_keep), "window_only_heads": _pairs(window_only),
        "all_keep_kept_share": float(kept[all_keep].sum() / kept.sum()) if kept.sum() > 0 else 0.0,
        "token0": {
            "raw": float(np.median(raw_counts)), "raw_range": [min(raw_counts), max(raw_counts)],
            "effective": float(np.median(eff_counts)), "effective_range": [min(eff_counts), max(eff_counts)],
            "per_sequence_raw": raw_counts, "per_sequence_effective": eff_counts,
            "head_rate_raw": head_t0.tolist(), "heads_raw": _pairs(head_t0 > 0.5),
        },
        "facts": (_fact_figures(torch.cat(scores), torch.cat(keeps), torch.cat(labels), torch.cat(decisions, -1))
                  if labels else None),
    }


def _pairs(mask: torch.Tensor) -> list[list[int]]:
    return [[int(l), int(h)] for l, h in torch.nonzero(mask)]


def _fact_figures(score: torch.Tensor, keep: torch.Tensor, fact: torch.Tensor, decisions: torch.Tensor) -> dict:
    """score, keep, fact: (N,) per token; decisions: (L*H, N) keep probabilities."""
    n_fact, n_filler = int(fact.sum()), int((~fact).sum())
    return {
        "auc": roc_auc(score, fact), "auc_per_decision": roc_auc(decisions.reshape(-1), fact.expand_as(decisions).reshape(-1)),
        "fact_tokens": n_fact, "filler_tokens": n_filler,
        "fact_keep_rate": float(keep[fact].mean()) if n_fact else None,
        "filler_keep_rate": float(keep[~fact].mean()) if n_filler else None,
    }


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / (n+ n-)); None without both."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    _, group, counts = torch.unique(score, return_inverse=True, return_counts=True)  # groups in ascending order
    first = counts.cumsum(0) - counts  # tokens scoring below each group
    rank = (first + (counts + 1) / 2).double()[group]  # 1-based ranks, ties share their mean rank
    return float((rank[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summary_rows(figures: dict) -> list[tuple[str, str]]:
    """(figure, value) lines of a `decision_figures` result, as `kvshrink inspect` and the model cards show them."""
    f, t0 = figures, figures["token0"]
    heads = f["layers"] * f["kv_heads"]
    cr = "all evicted" if f["flag_cr"] is None else f"{f['flag_cr']:.2f}"
    rows = [
        ("sequences; decided tokens per head", f"{f['sequences']}; {f['decided_tokens']:,}"),
        ("flag rate (flag-based CR)", f"{f['flag_rate']:.3f} ({cr})"),
        ("median |logit|", f"{f['median_abs_logit']:.1f}"),
        (f"decisions within reach of a gradient (|logit + noise| < {f['reach_halfwidth']:g})", f"{100 * f['reach']:.2f}%"),
        ("heads by flag rate: " + " / ".join(BUCKETS), " / ".join(str(f["buckets"][b]) for b in BUCKETS)),
        ("all-keep heads", ", ".join(f"L{l}h{h}" for l, h in f["all_keep_heads"]) or "none"),
        ("kept tokens held by all-keep heads", f"{100 * f['all_keep_kept_share']:.0f}%"),
        (f"heads evicting token 0, raw flag (of {heads})", _median_range(t0["raw"], t0["raw_range"], f["sequences"])),
        (f"heads evicting token 0, after {f['sinks']} sink(s)",
         _median_range(t0["effective"], t0["effective_range"], f["sequences"])),
    ]
    facts = f.get("facts")
    if facts:
        auc = "n/a" if facts["auc"] is None else f"{facts['auc']:.3f}"
        keep = lambda r: "n/a" if r is None else f"{r:.3f}"  # noqa: E731
        per = "n/a" if facts["auc_per_decision"] is None else f"{facts['auc_per_decision']:.3f}"
        rows += [("facts-vs-filler AUC: per token (keep probability averaged over heads); per decision", f"{auc}; {per}"),
                 ("keep rate: facts / filler", f"{keep(facts['fact_keep_rate'])} / {keep(facts['filler_keep_rate'])}"),
                 ("tokens: facts / filler", f"{facts['fact_tokens']:,} / {facts['filler_tokens']:,}")]
    return rows


def _median_range(median: float, span: list[int], sequences: int) -> str:
    if sequences == 1:
        return f"{median:g}"
    return f"{median:g} (in every sequence)" if span[0] == span[1] else f"{median:g} (median; {span[0]}-{span[1]} by sequence)"


@torch.no_grad()
def sequence_logits(model, ids: list[int]) -> torch.Tensor:
    """(L, Hkv, T) decision logits of one sequence: the decoder alone (no LM head), eval mode, no cache."""
    collected = []
    device = next(model.parameters()).device
    model.model(torch.tensor([ids], device=device), use_cache=False, dms_signals=TrainSignals(collect=collected))
    if not collected:
        raise KVShrinkError("this model's eviction is disabled (dms_disable_eviction): there are no decisions to inspect")
    return torch.stack([c["logits"][0].float().cpu() for c in sorted(collected, key=lambda c: c["layer"])])


def inspect_decisions(model, sequences: list[list[int]], facts=None) -> dict:
    """The figures of a DMS model's decisions on token sequences (one forward each, in eval mode, restored
    after), with the model's DMS window, sinks and tau. facts: as in `decision_figures`."""
    cfg = next((m.dms for m in model.modules() if isinstance(getattr(m, "dms", None), DMSConfig)), None)  # as attention applies it
    if cfg is None:
        raise KVShrinkError("this model has no DMS, so no eviction decisions to inspect; retrofit one with "
                            "`kvshrink retrofit MODEL --out DIR`")
    was_training = model.training
    model.eval()
    try:
        logits = [sequence_logits(model, ids) for ids in sequences]
    finally:
        model.train(was_training)
    return {"window": cfg.window, **decision_figures(logits, sinks=cfg.sinks, tau=cfg.tau, facts=facts)}


def text_sequences(tokenizer, text: str, sequences: int = 3, seq_len: int = 2048) -> list[list[int]]:
    """The first `sequences` consecutive `seq_len`-token windows of `text` (fewer if it is shorter)."""
    if sequences < 1:
        raise KVShrinkError(f"--sequences must be >= 1 (got {sequences})")
    if seq_len < 2:
        raise KVShrinkError(f"--seq-len must be >= 2 tokens (got {seq_len})")
    ids = tokenizer(text, verbose=False)["input_ids"]
    windows = [ids[i:i + seq_len] for i in range(0, min(len(ids), sequences * seq_len), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise KVShrinkError(f"the text has {len(ids)} token(s); a decision needs at least 2")
    return windows


def task_sequences(tokenizer, task: str, problems: int = 6, seed: int = 0, difficulty: int | None = None):
    """Held-out prompts of `task` through the chat template, and per prompt a (T,) bool mask of the tokens
    that overlap a fact (`kvshrink.tasks.fact_spans`). Returns (token id lists, masks)."""
    from ..prompts import chat_prompt
    from ..tasks import fact_spans, make_problems

    ids, masks = [], []
    for problem in make_problems(task, problems, seed=seed, difficulty=difficulty):
        tokens = chat_prompt(tokenizer, problem.prompt)
        text = chat_prompt(tokenizer, problem.prompt, tokenize=False)
        at = text.find(problem.prompt)
        offsets = _offsets(tokenizer, text, tokens)
        if at < 0 or offsets is None:
            raise KVShrinkError("cannot map this tokenizer's tokens back to the prompt's characters "
                                "(facts need a fast tokenizer whose chat template keeps the message as written)")
        spans = torch.tensor([[at + s, at + e] for s, e in fact_spans(problem)], dtype=torch.long).reshape(-1, 2)
        off = torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)  # (T, 2) character [start, end) per token
        overlap = (off[:, None, 0] < spans[None, :, 1]) & (off[:, None, 1] > spans[None, :, 0])
        ids.append(tokens)
        masks.append(overlap.any(-1))
    return ids, masks


def _offsets(tokenizer, text: str, tokens: list[int]) -> list | None:
    """Character offsets of `tokens` in `text`, if tokenizing `text` gives exactly these tokens."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    for special in (False, True):
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True, verbose=False)
        if enc["input_ids"] == tokens:
            return enc["offset_mapping"]
    return None


__all__ = ["BUCKETS", "decision_figures", "inspect_decisions", "roc_auc", "sequence_logits", "summary_rows", "task_sequences",
           "text_sequences"]
