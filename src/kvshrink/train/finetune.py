"""`kvshrink zoo finetune`: teach a pretrained model the synthetic tasks with one small LoRA adapter.

Why LoRA on a pretrained model: from-scratch models learned no retrieval in 60-150M tokens (zoo notes),
while SmolLM2 already retrieves. Supervision is dense and deterministic: the loss covers the worked
solution (every chain-of-thought line is a function of the problem) and the end-of-turn token, never
the prompt's filler. Problems are drawn fresh for every step (never repeated, never the evaluation's
seeds), mixing the tasks and a range of difficulties around each default, so contexts run up to
`max_context` tokens.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import KVShrinkError, out_folder
from ..loading import device_label, load
from ..prompts import chat_prompt
from ..tasks import TASKS, task_module
from ..zoo import folder_of
from .checkpoints import Checkpoints, restore, write_atomically
from .loop import DTYPE_HELP, Loop, bf16_autocast, check_training_dtype, setting, train_loop

# difficulty ranges drawn in training: below and above each task's default (4, 4, 2, 3)
DIFFICULTIES = {"arith": (2, 12), "vt": (1, 8), "niah": (1, 4), "hops": (1, 6)}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    """A fine-tune's settings; each field is also an option of `kvshrink zoo finetune` (its help is the field's)."""

    out: str = setting(help="run folder: checkpoints, metrics.jsonl, lora/", metavar="DIR")
    base: str = setting("smollm2", "model to adapt: a shipped name or a local HF folder", "MODEL")
    tasks: str = setting("arith,vt,niah,hops", "comma-separated task mixture, each NAME or NAME:WEIGHT (e.g. arith:3,vt:3,niah,hops)", "NAMES")
    steps: int = setting(600, "optimizer steps")
    batch_size: int = setting(4, "problems per step")
    lr: float = setting(5e-4, "AdamW peak learning rate: linear warm-up over --warmup steps, then cosine decay to a tenth")
    warmup: int = setting(20, "linear warm-up steps")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha")
    max_context: int = setting(1024, "longest training example in tokens")
    save_every: int = setting(25, "checkpoint every N steps")
    seed: int = setting(0, "training problem stream")
    max_minutes: float | None = setting(None, "wall-clock ceiling: checkpoint and stop")
    resume: bool = setting(False, "continue from OUT/checkpoints/latest")
    device: str = setting("auto", "auto | cpu | cuda", "DEVICE")
    dtype: str = setting("auto", DTYPE_HELP, "DTYPE")
    init_from: str | None = setting(None, "start from this fine-tune's adapter (a shipped name or folder): a second stage", "MODEL")

    def __post_init__(self):
        mixture = parse_tasks(self.tasks)
        for name in mixture:
            task_module(name)
        self.task_list, self.task_weights = list(mixture), list(mixture.values())
        if min(self.steps, self.batch_size, self.lora_r, self.save_every) < 1:
            raise KVShrinkError("--steps, --batch-size, --lora-r and --save-every must be >= 1")
        if self.lr <= 0 or self.warmup < 0:
            raise KVShrinkError(f"--lr must be > 0 and --warmup >= 0 (got {self.lr}, {self.warmup})")
        if self.max_context < 128:
            raise KVShrinkError(f"--max-context must be >= 128 (got {self.max_context})")
        check_training_dtype(self.dtype)


def parse_tasks(spec: str) -> dict[str, float]:
    """`--tasks`: comma-separated NAME or NAME:WEIGHT (weight 1 by default) -> {name: weight}."""
    mixture = {}
    for item in (t.strip() for t in spec.split(",") if t.strip()):
        name, _, weight = item.partition(":")
        try:
            mixture[name] = float(weight) if weight else 1.0
        except ValueError:
            mixture[name] = -1.0
        if mixture[name] <= 0:
            raise KVShrinkError(f"--tasks: {item!r} needs a positive weight, e.g. arith:2")
    return mixture


def training_example(cfg: FinetuneConfig, index: int, tokenizer) -> tuple[list[int], list[int]]:
    """(input ids, labels) of the `index`-th training problem: prompt through the chat template, then the
    worked solution and end-of-turn token; labels are -100 on the prompt. Redrawn until it fits."""
    rng = random.Random(f"finetune/{cfg.seed}/{index}")
    for _ in range(1000):
        task = rng.choices(cfg.task_list, weights=cfg.task_weights)[0]
        lo, hi = DIFFICULTIES[task]
        problem = TASKS[task].generate(rng, rng.randint(lo, hi))
        prompt = chat_prompt(tokenizer, problem.prompt)
        answer = tokenizer(problem.solution)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) <= cfg.max_context:
            return prompt + answer, [-100] * len(prompt) + answer
    raise KVShrinkError(f"almost no {cfg.tasks} problem fits --max-context {cfg.max_context} tokens; raise it (e.g. 1024)")


def learning_rate(cfg: FinetuneConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth of `lr` at the last step."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    return cfg.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, cfg.steps - 1))))


def accumulate_step(model, examples: list[tuple[list[int], list[int]]], device, bf16: bool = False) -> tuple[float, float]:
    """Backpropagate the step's mean cross-entropy over every scored token, one sequence at a time: no
    padding (a padded position costs as much as a real one) and the same gradient as one padded batch.
    Returns (loss, answer-token accuracy)."""
    scored = sum(sum(y != -100 for y in labels[1:]) for _, labels in examples)
    loss_sum, hits = 0.0, 0
    for ids, labels in examples:
        target = torch.tensor(labels[1:], device=device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1].float()
        loss = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / scored
        loss.backward()
        loss_sum += float(loss.detach())
        keep = target != -100
        hits += int((logits.detach().argmax(-1)[keep] == target[keep]).sum())
    return loss_sum, hits / scored


def _load_initial_adapter(model, trainable: dict, init_from: str, out: Path) -> None:
    """Copy an earlier fine-tune's LoRA weights into `model`, and keep its card for the new one."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = folder_of(init_from)
    weights = folder / "lora" / "adapter_model.safetensors"
    if not weights.is_file():
        raise KVShrinkError(f"--init-from {init_from}: no LoRA adapter at {weights}; name a fine-tuned model (e.g. tiny)")
    state = load_file(str(weights))
    expected = {n.replace(".default", ""): tuple(p.shape) for n, p in trainable.items()}  # peft's saved key names
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise KVShrinkError(f"--init-from {init_from}: its adapter does not fit this run (different --lora-r or targets)")
    set_peft_model_state_dict(model, state)
    out.mkdir(parents=True, exist_ok=True)
    if (folder / "README.md").is_file():
        (out / "earlier-stage.md").write_text((folder / "README.md").read_text())


def finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Run (or resume) the fine-tune; writes OUT/lora (a peft adapter folder, atomically). Returns the last metrics."""
    from peft import LoraConfig, get_peft_model

    out = out_folder(cfg.out)
    checkpoints = Checkpoints(out)
    resume_from = checkpoints.resume_point(cfg.resume, "fine-tune")
    model, tokenizer = load(cfg.base, device=cfg.device, dtype="float32")
    device = next(model.parameters()).device
    bf16 = bf16_autocast(cfg.dtype, device)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if cfg.init_from and resume_from is None:
        _load_initial_adapter(model, trainable, cfg.init_from, out)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=0.0)
    start = 0
    if resume_from is not None:
        tensors, opt_state, state = Checkpoints.load(resume_from)
        restore(trainable, tensors, state, resume_from)
        optimizer.load_state_dict(opt_state)
        start = state["step"]
    (out / "finetune.json").write_text(json.dumps({**asdict(cfg), "device_name": device_label(device)}, indent=1))
    model.train()

    def train_step(step: int) -> dict:
        """One AdamW step on `batch_size` fresh problems (a function of the step: nothing else to resume)."""
        examples = [training_example(cfg, step * cfg.batch_size + j, tokenizer) for j in range(cfg.batch_size)]
        loss, token_acc = accumulate_step(model, examples, device, bf16)
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "answer_token_accuracy": token_acc, "tokens": sum(len(ids) for ids, _ in examples)}

    loop = Loop("finetune", out, cfg.steps, cfg.save_every, cfg.max_minutes, progress=progress)
    last = train_loop(loop, start, optimizer, lambda step: learning_rate(cfg, step), train_step,
                      lambda step: checkpoints.save(step, trainable, optimizer.state_dict()), _status)
    if last.get("step") == cfg.steps:
        write_atomically(out / "lora", lambda tmp: model.save_pretrained(str(tmp)))
    return last


def _status(m: dict) -> str:
    return f"loss {m['loss']:.4f}  answer-token acc {m['answer_token_accuracy']:.3f}  {m['tokens_per_second']:.0f} tok/s"
