"""`kvshrink inspect`: every figure on planted decisions, then the command end to end on a tiny DMS model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli, tiny_model, with_random_dms
from kvshrink.dms import TrainSignals
from kvshrink.dms.diagnostics import decision_figures, inspect_decisions, roc_auc
from kvshrink.errors import KVShrinkError

pytestmark = pytest.mark.usefixtures("one_thread")

T = 21  # positions per planted sequence: tokens 0 .. 19 are decided (position p marks token p - 1)


def planted(seq: int) -> torch.Tensor:
    """(2, 3, T) logits, written per marked token (then shifted to the deciding positions). Magnitude 30 in
    layer 0 and 2 in layer 1, except head (1, 1)'s kept tokens at 0.25. With 1 sink and 2 sequences of 20
    decided tokens, the effective flag rates are:
      (0, 0) 0      all-keep, evicts token 0 (raw) in both sequences
      (0, 1) 0.95   window-only (every token flagged, the sink kept), evicts token 0 in both
      (0, 2) 0.5    tokens 1-10
      (1, 0) 0.05   token 1
      (1, 1) 0.25   tokens 1-5
      (1, 2) 0.025  all-keep; token 2 and token 0 (raw) in sequence 0 only
    """
    evict = torch.zeros(2, 3, T - 1, dtype=torch.bool)  # by marked token
    evict[0, 0, 0] = True
    evict[0, 1, :] = True
    evict[0, 2, 1:11] = True
    evict[1, 0, 1] = True
    evict[1, 1, 1:6] = True
    if seq == 0:
        evict[1, 2, 0] = evict[1, 2, 2] = True
    magnitude = torch.tensor([30.0, 2.0])[:, None, None].expand(2, 3, T - 1).clone()
    magnitude[1, 1, 6:] = 0.25
    by_token = torch.where(evict, magnitude, -magnitude)
    return torch.cat([torch.full((2, 3, 1), 99.0), by_token], dim=-1)  # position 0 decides nothing


def reach_of(logit: float, h: float = 0.5) -> float:
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    return sigmoid(h - logit) - sigmoid(-h - logit)


def test_planted_decisions_give_every_figure():
    f = decision_figures([planted(0), planted(1)], sinks=1, tau=0.1)
    assert (f["sequences"], f["decided_tokens"], f["layers"], f["kv_heads"]) == (2, 40, 2, 3)
    rates = [[0.0, 0.95, 0.5], [0.05, 0.25, 0.025]]
    assert f["head_flag_rate"] == rates  # each a correctly rounded quotient of small integers
    assert f["flag_rate"] == pytest.approx(1.775 / 6)
    assert f["flag_cr"] == pytest.approx(1 / (1 - 1.775 / 6))
    # lower bounds inclusive: .05 -> second bucket, .5 -> third, .95 -> window-only
    assert f["buckets"] == {"<.05": 2, ".05-.5": 2, ".5-.95": 1, ">=.95": 1}
    assert f["all_keep_heads"] == [[0, 0], [1, 2]] and f["window_only_heads"] == [[0, 1]]
    kept = [40, 2, 20, 38, 30, 39]
    assert f["all_keep_kept_share"] == pytest.approx((40 + 39) / sum(kept))
    t0 = f["token0"]
    assert t0["per_sequence_raw"] == [3, 2] and t0["raw"] == 2.5 and t0["raw_range"] == [2, 3]
    assert t0["per_sequence_effective"] == [0, 0] and t0["effective"] == 0 and t0["effective_range"] == [0, 0]
    assert t0["head_rate_raw"] == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.5]] and t0["heads_raw"] == [[0, 0], [0, 1]]
    # learned decisions: tokens 1-19 of 6 heads x 2 sequences = 228: 28 at |0.25|, 86 at |2|, 114 at |30|
    assert f["median_abs_logit"] == pytest.approx((2 + 30) / 2)
    assert f["reach_halfwidth"] == pytest.approx(0.5)
    assert f["reach"] == pytest.approx((28 * reach_of(0.25) + 86 * reach_of(2) + 114 * reach_of(30)) / 228)
    assert f["facts"] is None
    json.dumps(f)  # JSON-ready

    no_sink = decision_figures([planted(0), planted(1)], sinks=0, tau=0.2)
    assert no_sink["token0"]["effective"] == 2.5 and no_sink["head_flag_rate"][0][1] == 1.0
    assert no_sink["reach_halfwidth"] == pytest.approx(1.0)  # |z| < 5 at the model's tau


def test_facts_against_filler():
    """Head 0 keeps facts at logits -1 and 0, filler at 0, 1, -2, 0; head 1 keeps every token (logit -30)."""
    by_token = torch.tensor([0.0, -1.0, 1.0, 0.0, -2.0, 0.0])  # tokens 0-5; fact tokens 1 and 3
    logits = torch.stack([torch.cat([torch.zeros(1), by_token]), torch.full((7,), -30.0)])[None]  # (1, 2, 7)
    fact = torch.tensor([False, True, False, True, False, False, True])  # token 6 has no decision: ignored
    f = decision_figures([logits], facts=[fact])["facts"]
    # per token (head 1 adds the same to every score): token 1 beats 3 of the 4 filler tokens, token 3 beats 1, ties 2
    assert f["auc"] == pytest.approx((3 + 1 + 2 * 0.5) / 8)
    # per decision, 4 fact against 8 filler decisions: head 0 against head 0 as above (5), head 0's facts lose to
    # head 1's filler (0), head 1's facts beat head 0's filler (8) and tie head 1's (8 x 0.5)
    assert f["auc_per_decision"] == pytest.approx((5 + 0 + 8 + 4) / 32)
    assert (f["fact_tokens"], f["filler_tokens"]) == (2, 4)
    assert f["fact_keep_rate"] == 1.0 and f["filler_keep_rate"] == (0.75 + 1) / 2  # logit 0 keeps
    sunk = decision_figures([logits], sinks=1, facts=[fact])["facts"]  # the sink has no learned decision
    assert sunk["filler_tokens"] == 3 and sunk["auc"] == pytest.approx((2 + 1 + 0.5) / 6)
    assert sunk["auc_per_decision"] == pytest.approx((3.5 + 0 + 6 + 3) / 24) and sunk["filler_keep_rate"] == pytest.approx(5 / 6)


def test_roc_auc_ties_and_edges():
    s = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert roc_auc(s, torch.tensor([False, False, True, True])) == 1.0
    assert roc_auc(s, torch.tensor([True, True, False, False])) == 0.0
    assert roc_auc(torch.ones(4), torch.tensor([True, False, True, False])) == 0.5
    assert roc_auc(s, torch.ones(4, dtype=torch.bool)) is None
    with pytest.raises(KVShrinkError, match="at least 2"):
        decision_figures([torch.zeros(1, 1, 1)])


def test_inspect_matches_the_attention_flags():
    """On a model: the figures' shift and sinks agree with the flags the attention itself applies."""
    model = with_random_dms(tiny_model("llama"), window=4, evict_bias=6.0)
    model.model.layers[0].self_attn.dms.sinks = 2  # one DMSConfig, shared by every layer
    ids = [list(range(3, 40)), list(range(50, 80))]
    f = inspect_decisions(model, ids)
    flags = []
    for seq in ids:
        collected = []
        model(torch.tensor([seq]), use_cache=False, dms_signals=TrainSignals(collect=collected))
        flags.append(torch.stack([c["flags"][0, :, 1:] for c in collected]))  # (L, Hkv, T-1): tokens 0 .. T-2
    rate = torch.cat(flags, -1).float().mean(-1)
    assert sum(f["head_flag_rate"], []) == pytest.approx(rate.flatten().tolist(), abs=1e-6)
    assert 0 < f["flag_rate"] < 1 and f["window"] == 4 and f["sinks"] == 2
    assert f["token0"]["effective"] == 0
    with pytest.raises(KVShrinkError, match="no DMS"):
        inspect_decisions(tiny_model("llama"), ids)


@pytest.fixture(scope="module")
def dms_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-dms")
    with_random_dms(tiny_model("llama"), window=4, evict_bias=6.0).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_cli_json_on_text_and_task(dms_dir, tmp_path, capsys, monkeypatch):
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{4 + i % 120}" for i in range(150)))
    code, out, err = run_cli(["inspect", str(dms_dir), "--text", str(text), "--sequences", "3", "--seq-len", "64", "--json"],
                             capsys, monkeypatch)
    assert code == 0, err
    f = json.loads(out)
    assert f["source"]["tokens"] == [64, 64, 22] and f["sequences"] == 3 and f["decided_tokens"] == 63 + 63 + 21
    rates = [r for row in f["head_flag_rate"] for r in row]
    assert len(rates) == f["layers"] * f["kv_heads"] == sum(f["buckets"].values())
    assert all(0 <= r <= 1 for r in rates) and f["flag_rate"] == pytest.approx(sum(rates) / len(rates))
    assert f["flag_cr"] == pytest.approx(1 / (1 - f["flag_rate"]))
    assert 0 <= f["reach"] <= 1 and f["median_abs_logit"] >= 0 and 0 <= f["all_keep_kept_share"] <= 1
    assert f["token0"]["effective"] <= f["token0"]["raw"] <= len(rates) and f["facts"] is None

    code, out, err = run_cli(["inspect", str(dms_dir), "--tasks", "vt", "--problems", "2", "--json"], capsys, monkeypatch)
    assert code == 0, err
    f = json.loads(out)
    facts = f["facts"]
    assert f["source"]["task"] == "vt" and f["sequences"] == 2
    assert facts["fact_tokens"] > 0 and facts["filler_tokens"] > facts["fact_tokens"]
    assert 0 <= facts["auc"] <= 1 and 0 <= facts["auc_per_decision"] <= 1
    assert 0 <= facts["fact_keep_rate"] <= 1 and 0 <= facts["filler_keep_rate"] <= 1

    code, out, err = run_cli(["inspect", str(dms_dir), "--text", str(text), "--seq-len", "64"], capsys, monkeypatch)
    assert code == 0, err
    assert "flag-based CR" in out and "layer" in out


@pytest.mark.parametrize("args,message", [
    (["--text", "missing.txt"], "no such file"),
    (["--text", "x", "--tasks", "vt"], "not both"),
    (["--tasks", "magic"], "unknown task"),
    (["--tasks", "vt", "--problems", "0"], "--problems must be >= 1"),
    (["--seq-len", "1"], "--seq-len >= 2"),
])
def test_bad_input_exits_2(dms_dir, capsys, monkeypatch, args, message):
    code, _, err = run_cli(["inspect", str(dms_dir), *args], capsys, monkeypatch)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_model_without_dms_exits_2(tiny_model_dir, tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 w4")
    code, _, err = run_cli(["inspect", str(tiny_model_dir), "--text", str(text)], capsys, monkeypatch)
    assert code == 2 and "no DMS" in err


def test_model_card_diagnostics_section(tmp_path):
    from kvshrink.train.cards import set_accuracy, set_diagnostics, stages

    text = {"model": "m-dms8", "source": {"text": "pydoc held-out", "tokens": [21, 21]},
            **decision_figures([planted(0), planted(1)], sinks=1)}
    task = {**text, "source": {"task": "vt", "problems": 2, "seed": 0, "difficulty": 4, "tokens": [21, 21]}}
    card = tmp_path / "README.md"
    card.write_text("# m-dms8\n\n## How it was made\n\nsteps\n\n## Accuracy\n\ntable\n\n## Earlier stage\n\nold\n")
    set_diagnostics(card, text, task)
    out = card.read_text()
    assert out.index("## Accuracy") < out.index("## Diagnostics") < out.index("## Earlier stage")
    assert "`kvshrink inspect m-dms8 --sequences 2 --seq-len 21`" in out
    assert "`kvshrink inspect m-dms8 --tasks vt --problems 2 --difficulty 4`" in out
    assert "| heads by flag rate: <.05 / .05-.5 / .5-.95 / >=.95 | 2 / 2 / 1 / 1 |" in out
    assert "| heads evicting token 0, raw flag (of 6) | 2.5 (median; 2-3 by sequence) |" in out
    assert "| 0 | **0.00**\\* | **0.95**\\* | 0.50 |" in out and "| 1 | 0.05 | 0.25 | **0.03** |" in out
    set_diagnostics(card, text)  # replaced, not added
    again = card.read_text()
    assert again.count("## Diagnostics") == 1 and "--tasks vt" not in again and again.endswith("## Earlier stage\n\nold\n")
    set_accuracy(card, "new table")
    assert "new table" in card.read_text() and "## Diagnostics" in card.read_text()
    listed = stages(card.read_text())  # as a later stage's card lists it: both measured sections dropped
    assert not any("Diagnostics" in s or "new table" in s for s in listed) and listed[-1].startswith("## How it was made")
