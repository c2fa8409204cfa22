"""Shipped models: manifests (base -> LoRA -> DMS) load by name; every shipped model generates."""

from __future__ import annotations

import json

import pytest
import torch

import kvshrink
from kvshrink import zoo
from kvshrink.train.pack import pack_lora
from kvshrink.attach import dms_config
from kvshrink.errors import KVShrinkError


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path)
    return tmp_path


def test_lora_manifest_loads_merged_and_equals_peft(models_dir, tmp_path_factory):
    """A shipped LoRA (random, non-zero) loads by name, merged; its logits equal peft's unmerged model."""
    from peft import LoraConfig, get_peft_model

    base, tok = kvshrink.load("smollm2")
    torch.manual_seed(0)  # the random LoRA must not depend on what ran before
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    run = tmp_path_factory.mktemp("run")
    peft_model.save_pretrained(str(run / "lora"))
    from dataclasses import asdict

    from kvshrink.train.finetune import FinetuneConfig
    (run / "finetune.json").write_text(json.dumps({**asdict(FinetuneConfig(out=str(run), steps=2)), "device_name": "CPU"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5, "answer_token_accuracy": 0.9, "seconds": 7.0}) + "\n"
                                               for s in (1, 2)))
    provenance = tmp_path_factory.mktemp("provenance")
    pack_lora(run, models_dir / "lora-test", base="smollm2", provenance=provenance)
    card = (models_dir / "lora-test" / "README.md").read_text()  # written from the run's own settings
    assert "--steps 2" in card and "--pack src/kvshrink/zoo/models/lora-test" in card and "2 of 2" in card and "(7.0 s/step) on CPU" in card
    assert sorted(p.name for p in (models_dir / "lora-test").iterdir()) == ["README.md", "lora", "model.json"]  # no logs ship
    kept = [(provenance / "finetune.json").read_text(), (models_dir / "lora-test" / "lora/adapter_config.json").read_text()]
    assert all(str(run) not in text for text in kept)  # no machine paths, shipped or kept
    assert json.loads(kept[1])["base_model_name_or_path"] == "smollm2"
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        model, _ = kvshrink.load("lora-test")
        got = model(ids).logits
        plain, _ = kvshrink.load("smollm2")
        assert (plain(ids).logits - expected).abs().max() > 1e-3  # the adapter changes the model
    assert not any("lora" in n for n, _ in model.named_parameters())
    # fp32 rounding of merged vs unmerged LoRA is ~1e-4 on logits of ~30 (measured 6.5e-5 to 8e-5 over 4 seeds);
    # a wrong merge is off by O(1)
    assert (got - expected).abs().max() < 5e-4

    # a DMS adapter on top of it (tiny-dms8 -> tiny): manifest chain
    (models_dir / "lora-test-dms").mkdir()
    (models_dir / "lora-test-dms" / zoo.MANIFEST).write_text(json.dumps({"base": "lora-test", "dms": {"window": 4, "decision": "adapter"}}))
    with pytest.raises(KVShrinkError, match="adapter tensors are missing"):
        kvshrink.load("lora-test-dms")


def test_second_stage_starts_from_the_shipped_adapter(models_dir, tmp_path):
    """--init-from: the new run's LoRA weights start equal to the shipped adapter's file; a misfit is refused;
    the packed card lists the earlier stages, oldest first, all at one level."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from kvshrink.train.finetune import FinetuneConfig, _load_initial_adapter

    targets = ["q_proj", "v_proj"]
    first = get_peft_model(kvshrink.load("smollm2")[0], LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    (models_dir / "stage1").mkdir()
    first.save_pretrained(str(models_dir / "stage1" / "lora"))
    (models_dir / "stage1" / "README.md").write_text("# stage1\n\n## How it was made\n\nstep one\n\n## Accuracy\n\nold table\n")
    saved = load_file(str(models_dir / "stage1" / "lora" / "adapter_model.safetensors"))

    second = get_peft_model(kvshrink.load("smollm2")[0], LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = {n: p for n, p in second.named_parameters() if p.requires_grad}
    _load_initial_adapter(second, trainable, "stage1", tmp_path / "run")
    assert len(saved) == len(trainable)
    for n, p in trainable.items():
        key = n.replace(".default", "")
        assert torch.equal(p.detach(), saved[key]), n

    misfit = get_peft_model(kvshrink.load("smollm2")[0], LoraConfig(r=8, lora_alpha=8, target_modules=targets))
    with pytest.raises(KVShrinkError, match="does not fit"):
        _load_initial_adapter(misfit, {n: p for n, p in misfit.named_parameters() if p.requires_grad}, "stage1", tmp_path / "x")
    with pytest.raises(KVShrinkError, match="no LoRA adapter"):
        _load_initial_adapter(second, trainable, "no-such-model", tmp_path / "y")
    with pytest.raises(KVShrinkError, match="positive weight"):
        FinetuneConfig(out="unused", tasks="arith:0,vt")

    from dataclasses import asdict

    run = tmp_path / "run"
    second.save_pretrained(str(run / "lora"))
    cfg = FinetuneConfig(out=str(run), steps=1, tasks="arith:3,vt", init_from="stage1")
    (run / "finetune.json").write_text(json.dumps({**asdict(cfg), "device_name": "CPU"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.1, "answer_token_accuracy": 0.9, "seconds": 3.0}) + "\n")
    pack_lora(run, models_dir / "stage2", base="smollm2")
    card = (models_dir / "stage2" / "README.md").read_text()
    assert "--init-from stage1" in card and "weights arith 3, vt 1" in card
    assert "## Earlier stages" in card and "### Stage 1\n\n#### How it was made" in card and "old table" not in card
    assert "# stage1" not in card and "## Licence and intended use" in card  # the earlier title is not repeated
    from kvshrink.train.cards import set_accuracy

    set_accuracy(models_dir / "stage2" / "README.md", "new table")
    card = (models_dir / "stage2" / "README.md").read_text()
    assert "new table" in card and "## Earlier stage" in card and "Not measured yet" not in card

    # a third stage carries the whole chain: stage 2 one level down, stage 1 two levels down, no stale tables
    run3 = tmp_path / "run3"
    _load_initial_adapter(second, trainable, "stage2", run3)
    second.save_pretrained(str(run3 / "lora"))
    (run3 / "finetune.json").write_text(json.dumps({**asdict(cfg), "init_from": "stage2", "device_name": "CPU"}))
    (run3 / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    pack_lora(run3, models_dir / "stage3", base="smollm2")
    card = (models_dir / "stage3" / "README.md").read_text()
    assert "--init-from stage2" in card and "### Stage 2\n\n#### How it was made" in card and "##### " not in card  # one level
    assert card.index("step one") < card.index("### Stage 2") and "new table" not in card and "old table" not in card
    assert card.count("## Licence and intended use") == 1  # the model's own, not each stage's


def test_lora_pack_refuses_unfinished_run(models_dir, tmp_path):
    with pytest.raises(KVShrinkError, match="no finished LoRA adapter"):
        pack_lora(tmp_path, models_dir / "x", base="smollm2")


@pytest.mark.parametrize("name", zoo.adapter_names())
def test_every_shipped_model_loads_by_name_and_generates(name):
    model, tok = kvshrink.load(name)
    spec = zoo.adapter_spec(name)
    assert (dms_config(model) is not None) == bool(spec.get("dms"))
    out = kvshrink.generate(model, tok, "The Python language", max_new_tokens=8)
    assert out.stats["generated_tokens"] == 8 and (zoo.MODELS_DIR / name / "README.md").is_file()


def test_finetune_step_equals_one_padded_batch():
    """The fine-tune accumulates one unpadded sequence at a time; its gradient must equal the reference:
    one right-padded batch with an attention mask and the mean loss over every scored token."""
    from peft import LoraConfig, get_peft_model

    from kvshrink.train.finetune import FinetuneConfig, accumulate_step, training_example

    base, tok = kvshrink.load("smollm2")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    cfg = FinetuneConfig(out="unused", tasks="arith,hops", max_context=400)
    examples = [training_example(cfg, i, tok) for i in range(3)]
    assert len({len(ids) for ids, _ in examples}) > 1  # lengths differ, so the reference really pads
    params = [p for p in model.parameters() if p.requires_grad]

    loss, acc = accumulate_step(model, examples, "cpu")
    mine = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    width = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([x + [tok.eos_token_id] * (width - len(x)) for x, _ in examples])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in examples])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in examples])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    ref = ref.detach()
    assert abs(loss - ref.item()) < 1e-4 * ref.item()
    for g, p in zip(mine, params):
        assert (g - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-9
    assert 0.0 < acc <= 1.0
    model.zero_grad(set_to_none=True)
    loss_bf16, _ = accumulate_step(model, examples, "cpu", bf16=True)  # --dtype bfloat16: the same objective, bf16 matmuls
    assert abs(loss_bf16 - ref.item()) < 0.03 * ref.item(), (loss_bf16, ref.item())

