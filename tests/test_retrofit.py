"""The DMS retrofit on a tiny Llama first trained on the same text (a random model barely depends on what
it attends to, so its KL would say nothing)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import kvshrink
from conftest import run_cli
from kvshrink.attach import attach_dms
from kvshrink.dms.config import DMSConfig
from kvshrink.dms.diagnostics import inspect_decisions
from kvshrink.errors import KVShrinkError
from kvshrink.generation import generate_ids
from kvshrink.policies import DMSPolicy
from kvshrink.train.losses import kl_student_teacher, token_weights
from kvshrink.train.retrofit import RetrofitConfig, retrofit
from kvshrink.train.toy import SEQ, build_toy_base

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama trained for 150 steps on the toy topic corpus (held-out NLL ~1.39 nats, ideal ~1.36)."""
    return build_toy_base(tmp_path_factory.mktemp("toy") / "base")


def config(base_dir, out, **kw) -> RetrofitConfig:
    args = dict(model=str(base_dir), out=str(out), target_cr=4, window=8, steps=200, data=str(base_dir.parent / "train.txt"),
                batch_size=4, seq_len=SEQ, train="adapter", lr=1e-3, save_every=50, device="cpu", sinks=0)  # the toy's thresholds: no sinks
    args.update(kw)
    return RetrofitConfig(**args)


def heldout_kl(model, base, ids) -> float:
    with torch.no_grad():
        return float(kl_student_teacher(model(ids, use_cache=False).logits, base(ids, use_cache=False).logits))


@pytest.fixture(scope="module")
def retrofitted(base_dir, tmp_path_factory):
    """The paper's recipe: every weight trains, the borrowed query neuron decides."""
    out = tmp_path_factory.mktemp("dms4-all")
    last = retrofit(config(base_dir, out, train="all"), progress=False)
    return out, last


@pytest.fixture(scope="module")
def retrofitted_adapter(base_dir, tmp_path_factory):
    """The release's recipe: base frozen, only the eviction adapter trains. 400 steps, not 200: the first
    layer's adapter sees only the current token, so the KL of its blind evictions holds the rate below the
    target for longer (at 200 steps it ends at 3.4-3.6x, depending on the seed; at 400, 3.8-3.9x)."""
    out = tmp_path_factory.mktemp("dms4-adapter")
    last = retrofit(config(base_dir, out, train="adapter", steps=400), progress=False)
    return out, last


def measure(run_dir, base_dir):
    """(reads-based CR of greedy generation after 16 held-out prompts of 256 tokens, held-out KL over 8
    sequences of 300 tokens, the same KL for blind eviction). A DMS model's first layer decides from the
    token alone, so its eviction rate follows the mix of topics: 4 prompts (~60 sentences) moved the CR by
    +-0.3 between seeds of the held-out text, and one KL sequence put the same model above or below blind."""
    model, tok = kvshrink.load(run_dir)
    base, _ = kvshrink.load(base_dir)
    held = tok((base_dir.parent / "heldout.txt").read_text())["input_ids"]
    prompts = [held[i * 256:(i + 1) * 256] for i in range(16)]  # 256 tokens = 32 w
    _, stats, _ = generate_ids(model, prompts, DMSPolicy(8), max_new_tokens=16)
    ids = torch.tensor([held[4096 + i * 300:4096 + (i + 1) * 300] for i in range(8)])
    blind = attach_dms(kvshrink.load(base_dir)[0], DMSConfig(window=8, forced_keep_every=4))
    return stats["compression_ratio"], heldout_kl(model, base, ids), heldout_kl(blind, base, ids)


def test_retrofit_reaches_target_cr_with_low_kl(base_dir, retrofitted):
    cr, kl, kl_blind = measure(retrofitted[0], base_dir)
    assert 4 * 0.85 <= cr <= 4 * 1.15, cr
    # Untrained reference: evicting 3 tokens in 4 without looking (same window, same CR) costs this base
    # ~0.5 nats/token on held-out text, because it loses the sentence's topic word. A retrofit that learned
    # to keep the topic words must stay well below: we require < 0.1 (and < half the blind figure).
    assert kl < 0.1 and kl < 0.5 * kl_blind, (kl, kl_blind)


def test_adapter_recipe_reaches_target_cr(base_dir, retrofitted_adapter):
    """Frozen base, adapter only: on this 2-layer model it nears the CR and beats blind eviction (less
    clearly than full training: the base cannot adapt to the missing tokens). The CR is the flag-based one
    (the convention) on the 16 held-out prompts: the one-sided loss holds the flag rate just under its
    target, and the first layer decides from the token alone, so it follows the held-out topic mix; seeds
    0-3 gave 3.26-4.01 on one CPU (reads-based at 272 tokens and w = 8: 3.02-3.63)."""
    run_dir = retrofitted_adapter[0]
    _, kl, kl_blind = measure(run_dir, base_dir)
    model, tok = kvshrink.load(run_dir)
    held = tok((base_dir.parent / "heldout.txt").read_text())["input_ids"]
    flag_cr = inspect_decisions(model, [held[i * 256:(i + 1) * 256] for i in range(16)])["flag_cr"]
    assert 4 * 0.8 <= flag_cr <= 4 * 1.15, flag_cr
    assert kl < kl_blind, (kl, kl_blind)


def test_resume_is_exact(base_dir, tmp_path):
    one = tmp_path / "one"
    retrofit(config(base_dir, one, steps=100, train="all", lr=1e-3, save_every=25), progress=False)
    two = tmp_path / "two"
    retrofit(config(base_dir, two, steps=100, train="all", lr=1e-3, save_every=25, stop_at=50), progress=False)
    assert not (two / "config.json").exists()
    retrofit(config(base_dir, two, steps=100, train="all", lr=1e-3, save_every=25, resume=True), progress=False)
    a, _ = kvshrink.load(one)
    b, _ = kvshrink.load(two)
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert diff < 1e-6, diff
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 101))


def test_resume_with_a_new_recipe_keeps_its_phases_and_sinks_reach_the_model(base_dir, tmp_path):
    """A finished run extended with more steps and sinks: retrofit.json and the model card keep what each
    stretch of steps ran with; the final model keeps the sinks in its config and its policy."""
    from kvshrink.policies import for_model
    from kvshrink.train.cards import retrofit_card

    out = tmp_path / "run"
    retrofit(config(base_dir, out, steps=4, batch_size=2, save_every=2), progress=False)
    assert "phases" not in json.loads((out / "retrofit.json").read_text())
    retrofit(config(base_dir, out, steps=6, batch_size=2, save_every=2, sinks=2, target_cr=8, ramp_steps=2, resume=True), progress=False)
    settings = json.loads((out / "retrofit.json").read_text())
    assert [(p["until_step"], p["steps"], p["sinks"], p["target_cr"]) for p in settings["phases"]] == [(4, 4, 0, 4)]
    assert (settings["steps"], settings["sinks"], settings["target_cr"]) == (6, 2, 8)
    # the raised target ramps from the old one: 4 -> 8 over 2 steps after step 4
    targets = [json.loads(x)["target_cr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert targets[3:] == pytest.approx([4.0, 6.0, 8.0])
    card = retrofit_card("toy-dms8", out, "toy")
    assert "Steps 1-4:" in card and "Steps 5-6:" in card and "--sinks 2 --resume --pack src/kvshrink/zoo/models/toy-dms8" in card
    assert "ramped linearly from 4 to 8 over 2 steps from step 5" in card
    model, _ = kvshrink.load(out)
    assert for_model(model).sinks == 2
    with pytest.warns(UserWarning, match="overrides the trained DMS sinks 2"):
        assert for_model(model, "dms-immediate", sinks=0).sinks == 0


def test_phases_and_ramp_origins(tmp_path):
    """Which resumes leave a phase behind, and where a raised target's ramp starts."""
    from dataclasses import asdict

    from kvshrink.train.ramp import stages_with_origins
    from kvshrink.train.retrofit import _settings_with_phases

    path = tmp_path / "retrofit.json"
    first = RetrofitConfig(model="m", out="a", data="d", target_cr=4, steps=100, sinks=0)
    old = {k: v for k, v in asdict(first).items() if k != "sinks"}  # a file from before --sinks existed
    path.write_text(json.dumps(old))
    # same recipe (another folder, device, stop point, more saves): no phase
    same = RetrofitConfig(model="m", out="b", data="d", target_cr=4, steps=100, device="cpu", save_every=7, stop_at=80, sinks=0)
    assert "phases" not in _settings_with_phases(path, same, 40)
    # today's default (4 sinks below w = 512) is not what that old run trained with: a phase
    today = _settings_with_phases(path, RetrofitConfig(model="m", out="a", data="d", target_cr=4, steps=100), 40)
    assert [(p["until_step"], p["sinks"]) for p in today["phases"]] == [(40, 0)] and today["sinks"] == 4
    # cut short at step 40 mid-ramp (1 -> 4 over 80 steps reaches 2.5), then raised to 8 over 10 steps
    raised = _settings_with_phases(path, RetrofitConfig(model="m", out="a", data="d", target_cr=8, steps=60, ramp_steps=10), 40)
    assert [p["until_step"] for p in raised["phases"]] == [40] and raised["phases"][0]["sinks"] == 0
    (_, o1), (_, o2) = stages_with_origins(raised)
    assert o1 == (1.0, 0) and o2 == pytest.approx((2.5, 40))
    # resuming again from the same step, or rewinding before a phase's end, adds no empty stretch
    path.write_text(json.dumps(raised))
    again = _settings_with_phases(path, RetrofitConfig(model="m", out="a", data="d", target_cr=8, steps=60, ramp_steps=10, lr=1e-4), 40)
    assert [p["until_step"] for p in again["phases"]] == [40]
    assert "phases" not in _settings_with_phases(path, first, 30)


def test_truncated_checkpoint_names_the_file(base_dir, tmp_path):
    out = tmp_path / "run"
    retrofit(config(base_dir, out, steps=10, save_every=5, stop_at=5), progress=False)
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    target = latest / "trainable.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(KVShrinkError, match="trainable.safetensors"):
        retrofit(config(base_dir, out, steps=10, save_every=5, resume=True), progress=False)


def test_resume_writes_again_a_final_model_cut_short(tiny_model_dir, tmp_path):
    """A kill during the final save leaves the last checkpoint whole: --resume at the final step finds that
    the final model does not load (its weights truncated, or its config.json not yet renamed in) and writes it
    again from that checkpoint; a final model that loads is left alone. On the random tiny Llama: seconds."""
    from safetensors.torch import load_file

    data = tmp_path / "train.txt"
    data.write_text(" ".join(f"w{4 + i * 7 % 120}" for i in range(3000)))
    out = tmp_path / "run"
    run = lambda **kw: retrofit(config(tiny_model_dir, out, data=str(data), steps=2, batch_size=2, seq_len=32, save_every=2, **kw),  # noqa: E731
                                progress=False)
    assert run()["step"] == 2
    weights = out / "model.safetensors"
    checkpoint = load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors"))
    for cut_short in (lambda: weights.write_bytes(weights.read_bytes()[:1000]), (out / "config.json").unlink):
        cut_short()
        with pytest.raises(KVShrinkError):
            kvshrink.load(out)
        assert run(resume=True) == {}
        params = dict(kvshrink.load(out)[0].named_parameters())
        assert checkpoint and all(torch.equal(params[name], t) for name, t in checkpoint.items())
        assert not (out / ".tmp-write").exists()
    written = weights.stat().st_mtime_ns
    assert run(resume=True) == {} and weights.stat().st_mtime_ns == written


def test_saved_model_loads_in_plain_transformers(retrofitted_adapter):
    from transformers import AutoModelForCausalLM

    out, _ = retrofitted_adapter
    plain = AutoModelForCausalLM.from_pretrained(out)  # the DMS adapter tensors are reported unused and ignored
    assert not any("dms_proj_alpha" in n for n, _ in plain.named_parameters())
    assert plain.config.dms_window_size == 8


def _launch_two(base_dir, out, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port: the default one may still be held by an earlier run
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", port, "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kvshrink", "retrofit", str(base_dir), "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]


# Two processes sum their gradients in another order than one: ~1e-7 apart at first, and the gap grows
# ~2x a step through the eviction decisions (on one CPU, 3e-5 at step 10, 2e-3 at step 12, a flag flipped
# at 13). Eight steps check the data split, the seeding and the gradient sync before that gap says anything.
TWO_PROCESS_STEPS = 8


@pytest.fixture(scope="module")
def one_process_run(base_dir, tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    retrofit(config(base_dir, single, steps=TWO_PROCESS_STEPS, seq_len=64, save_every=TWO_PROCESS_STEPS), progress=False)
    return single


@pytest.fixture(scope="module")
def ddp_run(base_dir, tmp_path_factory):
    double = tmp_path_factory.mktemp("ddp")
    _launch_two(base_dir, double, two_process_args(base_dir))
    return double


def test_two_processes_match_one(one_process_run, ddp_run):
    """accelerate launch with 2 gloo processes (DDP): same global batch and data order, same loss curve."""
    a, b = _metrics(one_process_run), _metrics(ddp_run)
    assert len(a) == len(b) == TWO_PROCESS_STEPS
    assert b[-1]["processes"] == 2 and a[-1]["processes"] == 1
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x["step"], x["loss"], y["loss"])


def test_fsdp_two_processes_with_resume_match_ddp(base_dir, one_process_run, ddp_run, tmp_path):
    """FSDP2 over 2 gloo processes, stopped half-way and resumed from the gathered checkpoint: the loss
    curve of one process, and the final weights of the same run under DDP."""
    sharded, half = tmp_path / "fsdp", TWO_PROCESS_STEPS // 2
    _launch_two(base_dir, sharded, [*two_process_args(base_dir), "--fsdp", "--stop-at", str(half)])
    assert (sharded / "checkpoints" / "latest").read_text().strip() == f"step-{half:06d}"
    _launch_two(base_dir, sharded, [*two_process_args(base_dir), "--fsdp", "--resume"])
    a, b = _metrics(one_process_run), _metrics(sharded)
    assert [x["step"] for x in b] == list(range(1, TWO_PROCESS_STEPS + 1)) and b[-1]["processes"] == 2
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6), (x["step"], x["loss"], y["loss"])
    from safetensors.torch import load_file

    wd, wf = load_file(str(ddp_run / "model.safetensors")), load_file(str(sharded / "model.safetensors"))
    adapter = [k for k in wd if "dms_proj_alpha" in k]
    assert adapter and set(wd) == set(wf)
    assert max(float((wd[k] - wf[k]).abs().max()) for k in wd) < 1e-6


def two_process_args(base_dir):
    """The CLI form of `one_process_run`'s config."""
    return ["--target-cr", "4", "--window", "8", "--steps", str(TWO_PROCESS_STEPS), "--data", str(base_dir.parent / "train.txt"),
            "--batch-size", "4", "--seq-len", "64", "--train", "adapter", "--lr", "1e-3", "--save-every", str(TWO_PROCESS_STEPS),
            "--device", "cpu", "--sinks", "0"]


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target-cr", "0.5"], "--target-cr must be >= 1"),
        (["--steps", "0"], "--steps must be > 0"),
        (["--data", "/no/such/file.txt"], "not found"),
        (["--train", "adapter", "--decision", "neuron"], "needs --train all"),
    ],
)
def test_bad_input_exit_2(base_dir, tmp_path, args, message, capsys, monkeypatch):
    code, _, err = run_cli(["retrofit", str(base_dir), "--out", str(tmp_path / "x"), "--data", str(base_dir.parent / "train.txt"), *args],
                           capsys, monkeypatch)
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--fsdp"], "--fsdp shards over processes"),
        (["--fsdp", "--neuron-decay", "linear"], "use --neuron-decay instant with --fsdp"),
    ],
)
def test_bad_fsdp_input_exit_2(base_dir, tmp_path, args, message):
    """In a process of its own: an FSDP Accelerator would stay in this process's accelerate state."""
    proc = subprocess.run([sys.executable, "-m", "kvshrink", "retrofit", str(base_dir), "--out", str(tmp_path / "x"),
                           "--data", str(base_dir.parent / "train.txt"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_model_folder_without_weights(tmp_path, base_dir):
    (tmp_path / "config.json").write_text((base_dir / "config.json").read_text())
    with pytest.raises(KVShrinkError, match="no weights"):
        retrofit(config(base_dir, tmp_path / "o", model=str(tmp_path)), progress=False)


def test_interrupted_checkpoint_write_is_ignored(base_dir, tmp_path):
    """A write killed half-way leaves only a `.tmp-*` folder, which `latest` never names."""
    out = tmp_path / "run"
    retrofit(config(base_dir, out, steps=10, save_every=5, stop_at=5), progress=False)
    partial = out / "checkpoints" / ".tmp-step-000010"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\x00" * 10)
    last = retrofit(config(base_dir, out, steps=10, save_every=5, resume=True), progress=False)
    assert last["step"] == 10


def test_teacher_data_and_plot(base_dir, tmp_path, retrofitted, monkeypatch):
    from kvshrink.train import data
    from kvshrink.train.data import token_blocks
    from kvshrink.train.retrofit import plot_training

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t1 w4 w5\nt2 w8\nt3 w12 w13 w14\n")
    model, tok = kvshrink.load(base_dir)
    blocks = token_blocks(f"teacher:{prompts}", tok, 16, tmp_path / "cache", teacher=model)
    assert blocks.ids.shape[1] == 16 and len(blocks) >= 3
    assert blocks.answer_start.tolist() == [16] * len(blocks)  # a text stream: no answer to weight
    monkeypatch.setattr(data, "teacher_documents", lambda *a, **k: pytest.fail("sampled again instead of reading the cache"))
    again = token_blocks(f"teacher:{prompts}", tok, 16, tmp_path / "cache", teacher=model)
    assert torch.equal(again.ids, blocks.ids) and torch.equal(again.answer_start, blocks.answer_start)
    packed = list((tmp_path / "cache").glob("blocks2-*.pt"))
    assert len(packed) == 1
    packed[0].unlink()  # lose the packed cache: the sampled documents survive
    monkeypatch.undo()
    assert torch.equal(token_blocks(f"teacher:{prompts}", tok, 16, tmp_path / "cache", teacher=model).ids, blocks.ids)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)  # another teacher (a re-tuned base): its own samples, not the cached ones
    token_blocks(f"teacher:{prompts}", tok, 16, tmp_path / "cache", teacher=model)
    assert len(list((tmp_path / "cache").glob("blocks2-*.pt"))) == 2
    png = plot_training(retrofitted[0])
    assert png.stat().st_size > 10_000


def test_bf16_retrofit_follows_fp32(base_dir, tmp_path):
    """--dtype bfloat16 (autocast, fp32 master weights) trains like fp32 on the same data: per-step KL and flag rate
    close to the fp32 run's. It runs as its own process: accelerate keeps one precision per process. On a CPU
    with native bf16 (AMX), rounded logits evict other tokens: KL 0.030 against 0.023 at step 3, 0.085 against
    0.075 at step 4; with fp32 master weights the flag rate stays within 0.012 and the loss within 4%."""
    runs = {}
    for bf16 in (False, True):
        out = tmp_path / f"bf16-{bf16}"
        if bf16:
            proc = subprocess.run([sys.executable, "-m", "kvshrink", "retrofit", str(base_dir), "--out", str(out), "--target-cr", "4",
                                   "--window", "8", "--steps", "4", "--data", str(base_dir.parent / "train.txt"), "--batch-size", "4",
                                   "--seq-len", str(SEQ), "--train", "adapter", "--lr", "1e-3", "--device", "cpu", "--dtype", "bfloat16"],
                                  capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            retrofit(config(base_dir, out, steps=4), progress=False)
        runs[bf16] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(runs[True]) == 4
    for ref, low in zip(runs[False], runs[True]):
        assert low["loss"] == pytest.approx(ref["loss"], rel=0.05)
        assert low["kl"] == pytest.approx(ref["kl"], abs=0.015)
        assert low["flag_rate"] == pytest.approx(ref["flag_rate"], abs=0.02)


def test_data_sources(tmp_path, base_dir):
    """Text, jsonl, folder and datasets-folder sources all become the same packed blocks."""
    from datasets import Dataset

    from kvshrink.train.data import token_blocks

    _, tok = kvshrink.load(base_dir)
    docs = ["t1 w4 w5 w6 .", "t2 w8 w9 .", "t3 w12 w13 w14 ."] * 4
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text(docs[0])
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "hf"))
    from_jsonl = token_blocks(str(tmp_path / "d.jsonl"), tok, 8, tmp_path / "c")
    from_hf = token_blocks(str(tmp_path / "hf"), tok, 8, tmp_path / "c")
    assert torch.equal(from_jsonl.ids, from_hf.ids) and from_jsonl.ids.shape[1] == 8
    assert token_blocks(str(tmp_path / "folder"), tok, 4, tmp_path / "c").ids.shape == (1, 4)  # 6 tokens + EOS -> one block of 4
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(KVShrinkError, match="bad.jsonl:1 is not valid JSON"):
        token_blocks(str(tmp_path / "bad.jsonl"), tok, 8, tmp_path / "c")
    # `pydoc`: the train half of CPython's docs as one running text (+ EOS), whatever folder we run in
    from kvshrink.corpora import pydoc_split

    prose = tok(pydoc_split()[0])["input_ids"]
    blocks = token_blocks("pydoc", tok, 64, tmp_path / "c")
    assert blocks.ids.shape == ((len(prose) + 1) // 64, 64) and blocks.ids[0].tolist() == prose[:64]


def test_init_from_starts_a_second_stage_from_a_dms_adapter(base_dir, retrofitted_adapter, tmp_path):
    """--init-from copies a shipped DMS pack's eviction adapter (at lr ~0 it stays as it was) and its card
    becomes the new card's earlier stage; a model without an adapter, or the neuron recipe, is refused."""
    from kvshrink.train.pack import dms_adapter_tensors, pack_adapter
    from kvshrink.train.cards import retrofit_card

    first = pack_adapter(retrofitted_adapter[0], tmp_path / "toy-dms4", base="toy")
    out = tmp_path / "second"
    retrofit(config(base_dir, out, steps=1, lr=1e-12, init_from=str(first)), progress=False)
    before, after = dms_adapter_tensors(first), dms_adapter_tensors(out)
    assert before.keys() == after.keys() and any(t.abs().sum() > 0 for t in before.values())
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    card = retrofit_card("toy-dms4-b", out, "toy")
    assert "starts from the adapter of" in card and "## Earlier stage" in card and f"--init-from {first}" in card
    with pytest.raises(KVShrinkError, match="adapter tensors are missing.*name an adapter-DMS model"):
        retrofit(config(base_dir, tmp_path / "third", steps=1, init_from=str(base_dir)), progress=False)
    with pytest.raises(KVShrinkError, match="--init-from continues an eviction adapter"):
        config(base_dir, tmp_path / "fourth", train="all", init_from=str(first))


def test_whole_document_packing_and_masked_kl():
    """Task data gets one whole document per block (cut only past the block length), and padding counts in no loss."""
    from kvshrink.train.data import PAD, pack_whole

    docs = [[1, 2, 3], [4, 5], [20] * 9]
    blocks = pack_whole(docs, eos=0, seq_len=7, prompt_lengths=[2, 1, 8])
    assert blocks.ids.tolist() == [[1, 2, 3, 0] + [PAD] * 3, [4, 5, 0] + [PAD] * 4, [20] * 7]
    assert blocks.answer_start.tolist() == [2, 1, 7]  # a prompt cut by the block leaves no answer in it
    assert pack_whole(docs, eos=0, seq_len=7).answer_start.tolist() == [7, 7, 7]
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    live = torch.tensor([[True] * 5, [True, True, False, False, False]])
    per_token = torch.nn.functional.kl_div(teacher.log_softmax(-1), student.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert float(kl_student_teacher(student, teacher, live)) == pytest.approx(float(per_token[live].mean()), rel=1e-5)
    assert float(kl_student_teacher(student, teacher)) == pytest.approx(float(per_token.mean()), rel=1e-5)
    # --answer-weight: tokens from each row's answer start on count K times, padding still not at all
    weights = token_weights(live, torch.tensor([3, 1]), 4.0)
    assert weights.tolist() == [[1, 1, 1, 4, 4], [1, 4, 0, 0, 0]]
    expected = (per_token * weights).sum() / weights.sum()
    assert float(kl_student_teacher(student, teacher, weights)) == pytest.approx(float(expected), rel=1e-5)
    assert torch.equal(token_weights(live, torch.tensor([3, 1]), 1.0), live.float())
    with pytest.raises(KVShrinkError, match="--answer-weight"):
        RetrofitConfig(model="m", out="o", data="d", answer_weight=0.5)


def test_compression_loss_one_and_two_sided():
    """One-sided (the paper) penalizes only an eviction rate below the target; two-sided pulls both ways."""
    from kvshrink.train.losses import compression_loss

    rates = torch.tensor([0.5, 0.9], requires_grad=True)
    assert float(compression_loss(rates, 0.7)) == pytest.approx((0.2 + 0.0) / 2)
    compression_loss(rates, 0.7).backward()
    assert rates.grad.tolist() == [-0.5, 0.0]  # only the sequence below the target is pushed up
    rates.grad = None
    assert float(compression_loss(rates, 0.7, "two-sided")) == pytest.approx((0.2 + 0.2) / 2)
    compression_loss(rates, 0.7, "two-sided").backward()
    assert rates.grad.tolist() == [-0.5, 0.5]  # and the one above it is pulled down
    rates.grad = None
    compression_loss(rates, 0.7, "squared").backward()
    assert float(compression_loss(rates, 0.7, "squared")) == pytest.approx(5 * (0.04 + 0.04) / 2)
    assert rates.grad.tolist() == pytest.approx([-1.0, 1.0])  # 10 * gap / 2: as hard as |gap| at a gap of 0.1
    with pytest.raises(KVShrinkError, match="--cr-loss"):
        RetrofitConfig(model="m", out="o", data="d", cr_loss="both")


def test_compression_loss_by_length():
    """--cr-by-length: a 256-token problem pulls on the eviction rate a quarter as hard as a full 1,024-token
    context (and a longer one no harder than a full one)."""
    from kvshrink.train.losses import compression_loss, length_weights

    live = torch.zeros(3, 2048, dtype=torch.bool)
    live[0, :256], live[1, :1024], live[2, :] = True, True, True
    weights = length_weights(live, 1024)
    assert weights.tolist() == [0.25, 1.0, 1.0]
    rates = torch.tensor([0.5, 0.5, 0.9], requires_grad=True)
    loss = compression_loss(rates, 0.7, "two-sided", weights)
    assert float(loss) == pytest.approx((0.25 * 0.2 + 0.2 + 0.2) / 3)
    loss.backward()
    assert rates.grad.tolist() == pytest.approx([-0.25 / 3, -1 / 3, 1 / 3])


def test_linear_neuron_decay_removes_weight_and_bias():
    """Zeroing the borrowed q_proj rows over several steps reaches the same rows as zeroing at once (Qwen2 has a q bias)."""
    from conftest import tiny_model

    from kvshrink.train.retrofit import _shift_borrowed_rows, borrowed_rows

    model = attach_dms(tiny_model("qwen2"), DMSConfig(window=4))
    with torch.no_grad():  # HF initialises biases to zero; give them something to remove
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    rows = borrowed_rows(model)
    q0 = model.model.layers[0].self_attn.q_proj
    assert q0.bias is not None and q0.bias[rows[0]].abs().sum() > 0
    original = [(l.self_attn.q_proj.weight.detach()[r].clone(), l.self_attn.q_proj.bias.detach()[r].clone())
                for l, r in zip(model.model.layers, rows)]
    for _ in range(4):
        _shift_borrowed_rows(model, rows, original, 0.25)
    for layer, r in zip(model.model.layers, rows):
        assert layer.self_attn.q_proj.weight[r].abs().max() < 1e-6 and layer.self_attn.q_proj.bias[r].abs().max() < 1e-6
