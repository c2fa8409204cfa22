"""DMS retrofit: logit distillation from the model itself, with a compression target ramped up.

Student = MODEL with DMS attached; teacher = the same weights with eviction off (and, for the neuron
variant, the borrowed channel intact). Per step (the paper's objective):

    loss = KL(student || teacher), averaged over tokens (answer tokens weighted by --answer-weight, 1 = the paper)
         + mean over sequences of clamp(target_flag_rate(step) - mean hard flag, 0)   (--cr-loss two-sided: |...|; squared: 5 (...)^2)
           (--cr-by-length: each sequence's term times min(1, its tokens / aim_context))

target_flag_rate follows a CR ramped linearly from 1 to --target-cr, reached after 80% of the steps
(--ramp-steps). A resume that raises --target-cr (a DMS-4 run carried on to DMS-8) ramps from the old
target to the new one over --ramp-steps, starting where the old settings stopped.
The flag rate aimed at is 1 - 1/CR, the release's flag-based CR (docs/conventions.md). --aim-context L keeps the
earlier rule for old recipes: the rate that makes the reads-based CR reach the target at L tokens, with
window w f = 1 - (L / CR - w) / (L - w) (a "DMS-8" trained that way is a flag-based DMS-10).
--export-at 4,8 saves a loadable model each time the ramp passes one of those CRs and stops after the
last, as the release takes its 8x checkpoint mid-way through a 1 -> 16 ramp: one run yields DMS-4 and DMS-8.

Gumbel noise is seeded by (seed, step, global sample index), never by process rank, so one and two
processes see the same noise and data. Checkpoints are written to a temporary folder and renamed, then
`checkpoints/latest` is replaced atomically: an interrupted write never leaves a checkpoint that loads. The
final model's files are renamed into OUT with config.json last, so a save cut short leaves a folder that does
not load; a rerun with --resume at the final step finds that and writes it again from the last checkpoint.

Read top-down: `setup` (processes, models, data, optimizer, the checkpoint resumed from), `train_step` (one
optimizer step, its loss from `losses`, its target from `ramp`), the loop (`loop.train_loop`, shared with the
fine-tune: logging, checkpoints, stops; `take_exports` for --export-at), `save_final`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..dms.signals import TrainSignals
from ..errors import KVShrinkError, check_cr, check_sinks, check_window, out_folder
from .checkpoints import Checkpoints, restore, write_atomically
from .loop import DTYPE_HELP, Loop, bf16_autocast, check_training_dtype, recorded_dtype, setting, train_loop
from .losses import CR_LOSSES, compression_loss, flag_rate_for, kl_student_teacher, length_weights, noise_for, token_weights
from .ramp import ramp_origin, ramped_cr

ADAPTER_LR, ALL_LR = 3e-5, 1e-5


@dataclass
class RetrofitConfig:
    """A retrofit's settings; each field is also an option of `kvshrink retrofit` (its help is the field's)."""

    model: str = setting(help="the model to retrofit: a shipped name or a local HF folder (Llama, Qwen2, Qwen3, Mistral)", metavar="MODEL")
    out: str = setting(help="output folder: checkpoints, metrics.jsonl, final HF model", metavar="DIR")
    data: str = setting(help="text/jsonl file, folder, datasets folder, pydoc (the Python docs' train half), stdlib (the standard "
                             "library's source), teacher:FILE (teacher continues each line), task:NAME[,NAME][:N] (teacher answers N "
                             "generated problems per task), gold:NAME[,NAME] (a fresh problem per sample with its gold solution), "
                             "passkey:N, or several joined with +", metavar="SRC")
    target_cr: float = setting(8.0, "compression ratio to reach (>= 1)")
    window: int = setting(256, "delayed-eviction window w (>= 0)")
    steps: int = setting(1000, "optimizer steps")
    batch_size: int = setting(2, "sequences per step, over all processes")
    grad_accum: int = setting(1, "gradient accumulation micro-steps")
    seq_len: int = setting(512, "tokens per sequence")
    lr: float | None = setting(None, "learning rate (default 3e-5 adapter, 1e-5 all)")
    warmup: int = setting(0, "linear warm-up steps")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    train: str = setting("all", "all (the paper) | adapter (the release: base frozen)")
    decision: str | None = setting(None, "neuron | adapter (default: neuron with all, adapter with adapter)")
    neuron_decay: str = setting("instant", "instant | linear (over the first 10% of steps, as DMC): how the borrowed q_proj row is zeroed")
    cr_loss: str = setting("one-sided", "one-sided (the paper: penalize too little eviction) | two-sided (also too much) | "
                                        "squared (two-sided, fading near the target so that the KL decides which tokens go)")
    aim_context: int | None = setting(None, "old recipes only: aim the reads-based CR at the target at this context "
                                            "(default: flag target 1 - 1/CR, the release)")
    ramp_steps: int | None = setting(None, "steps over which the CR ramps to the target (default 80% of --steps)")
    sinks: int | None = setting(None, "never evict a sequence's first N tokens (attention sinks; default 4 below w = 512, 0 from there, "
                                      "as the release)")
    answer_weight: float = setting(1.0, "KL weight of the teacher's answer tokens (task:/passkey: data) against 1 for the prompt (1 = the paper)")
    cr_by_length: bool = setting(False, "weight each sequence's compression loss by min(1, its tokens / --aim-context), "
                                        "so short problems are not pushed to the eviction rate aimed at long contexts")
    save_every: int = setting(50, "checkpoint every N steps")
    seed: int = setting(0, "data order and Gumbel noise seed")
    max_minutes: float | None = setting(None, "wall-clock ceiling: checkpoint and stop")
    stop_at: int | None = setting(None, "checkpoint and stop after this step (resume later)")
    fsdp: bool = setting(False, "shard weights, gradients and optimizer state with FSDP2 instead of DDP (under accelerate launch)")
    resume: bool = setting(False, "continue from OUT/checkpoints/latest")
    device: str = setting("auto", "auto | cpu | cuda", "DEVICE")
    dtype: str = setting("auto", DTYPE_HELP, "DTYPE")
    data_cache: str | None = setting(None, "where tokenized blocks and teacher samples are cached (default OUT/data-cache)", "DIR")
    init_from: str | None = setting(None, "start the eviction adapter from this DMS model's (a shipped name or retrofit folder; "
                                          "--train adapter): a second stage on new data", "MODEL")
    attention: str = setting("auto", "training attention: flex (fused, no TxT mask; CUDA) | math | auto (flex on CUDA)")
    export_at: tuple[float, ...] = setting((), "e.g. 4,8: save OUT/cr-4, OUT/cr-8 as the ramp passes each CR, stop after the last "
                                               "(ramp past them with --target-cr 16)", "LIST")

    def __post_init__(self):
        check_cr(self.target_cr, "--target-cr")
        check_window(self.window)
        if self.steps <= 0:
            raise KVShrinkError(f"--steps must be > 0 (got {self.steps})")
        if self.train not in ("all", "adapter"):
            raise KVShrinkError(f"--train must be 'all' or 'adapter' (got {self.train!r})")
        if self.decision is None:
            self.decision = "neuron" if self.train == "all" else "adapter"
        if self.decision not in ("neuron", "adapter"):
            raise KVShrinkError(f"--decision must be 'neuron' or 'adapter' (got {self.decision!r})")
        if self.init_from and self.decision != "adapter":
            raise KVShrinkError("--init-from continues an eviction adapter: use it with --train adapter")
        if self.train == "adapter" and self.decision == "neuron":
            raise KVShrinkError("--train adapter --decision neuron trains nothing: the neuron variant needs --train all")
        if self.neuron_decay not in ("instant", "linear"):
            raise KVShrinkError(f"--neuron-decay must be 'instant' or 'linear' (got {self.neuron_decay!r})")
        if self.cr_loss not in CR_LOSSES:
            raise KVShrinkError(f"--cr-loss must be one of {', '.join(CR_LOSSES)} (got {self.cr_loss!r})")
        if self.fsdp and self.decision == "neuron" and self.neuron_decay == "linear":
            raise KVShrinkError("--neuron-decay linear edits weight rows in place, which sharded weights do not allow: "
                                "use --neuron-decay instant with --fsdp")
        if min(self.batch_size, self.grad_accum, self.save_every) < 1 or self.seq_len < 2:
            raise KVShrinkError("--batch-size, --grad-accum and --save-every must be >= 1 and --seq-len >= 2")
        if self.lr is None:
            self.lr = ADAPTER_LR if self.train == "adapter" else ALL_LR
        if self.answer_weight < 1:
            raise KVShrinkError(f"--answer-weight must be >= 1 (got {self.answer_weight}); 1 weights every token alike, as the paper")
        if self.lr <= 0 or self.warmup < 0 or (self.ramp_steps is not None and self.ramp_steps < 1):
            raise KVShrinkError(f"--lr must be > 0, --warmup >= 0 and --ramp-steps >= 1 (got {self.lr}, {self.warmup}, {self.ramp_steps})")
        if not self.data:
            raise KVShrinkError("--data is required: a text file/folder, teacher:PROMPTS.txt or task:NAME[,NAME][:N]")
        check_training_dtype(self.dtype)
        check_sinks(self.sinks)
        if self.sinks is None:
            self.sinks = default_sinks(self.window)
        if self.attention not in ("auto", "flex", "math"):
            raise KVShrinkError(f"--attention must be auto, flex or math (got {self.attention!r})")
        self.export_at = tuple(sorted(float(x) for x in self.export_at))
        if any(x <= 1 or x > self.target_cr for x in self.export_at):
            raise KVShrinkError(f"--export-at values must lie in (1, --target-cr {self.target_cr:g}] (got {list(self.export_at)})")


# `kvshrink retrofit --profile NAME`: named recipes; an option left at its default takes the profile's value.
# "release" and "release-tasks" are the recipe of benchmarks/gpu_retrofit.py, which made the shipped DMS models
# (docs/results/retrofit-gpu.md): the ramp runs 1 -> 16 and DMS-4 and DMS-8 are saved as it passes them.
_RELEASE = {"train": "adapter", "target_cr": 16.0, "export_at": (4.0, 8.0), "grad_accum": 4, "save_every": 25}
PROFILES = {
    "paper": ("the paper: every weight trains, a borrowed query channel decides (the options' own defaults)", {}),
    "release": ("the authors' release, as smollm2-dms4/8 were made: adapter only, lr 3e-5, 32 x 2,048 tokens a step, "
                "w = 64, CR ramped 1 -> 16 over 335 steps, OUT/cr-4 and OUT/cr-8 saved as it passes them",
                {**_RELEASE, "window": 64, "steps": 335, "ramp_steps": 335, "seq_len": 2048, "batch_size": 32}),
    "release-tasks": ("the same on task problems, as tiny-dms4/8 were made: w = 16, 112 x 1,024-token blocks a step, 268 steps",
                      {**_RELEASE, "window": 16, "steps": 268, "ramp_steps": 268, "seq_len": 1024, "batch_size": 112}),
    "cpu-tasks": ("a CPU-sized task run (the former `kvshrink zoo retrofit` defaults, as tiny-dms8-w0 was made): "
                  "adapter only, w = 16, 300 steps of 2 x 1,024 tokens",
                  {"train": "adapter", "window": 16, "steps": 300, "seq_len": 1024, "save_every": 25}),
}

SHORT_WINDOW, SHORT_WINDOW_SINKS = 512, 4


def default_sinks(window: int) -> int:
    """4 sinks below w = 512, none from there (the release, w = 512). Measured at w = 64
    (docs/results/retrofit-ablations.md): without sinks the adapter could not follow the CR ramp (flag CR 3.5 where
    the others reached 7.5) and 15 heads still evicted token 0; 1 and 4 sinks were equal within noise."""
    return SHORT_WINDOW_SINKS if window < SHORT_WINDOW else 0


def borrowed_rows(model) -> list[list[int]]:
    """Per layer, the q_proj output rows the neuron variant borrows (last channel, first head of each group)."""
    attn = model.model.layers[0].self_attn
    group, d = attn.n_heads // attn.n_kv_heads, attn.head_dim
    return [[(kv * group) * d + d - 1 for kv in range(attn.n_kv_heads)] for _ in model.model.layers]


def learning_rate(cfg: RetrofitConfig, step: int) -> float:
    """Linear warm-up over --warmup steps, then constant (the release)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


@dataclass
class Run:
    """A retrofit under way: what `setup` built, which its steps and saves read."""

    cfg: RetrofitConfig
    acc: Any  # accelerate.Accelerator
    out: Path
    checkpoints: Checkpoints
    model: Any  # the student as accelerate prepared it (DDP or FSDP on several processes)
    teacher: Any  # a frozen copy (--train all), or None: the student with eviction off is its own teacher
    tokenizer: Any
    source: Any  # training blocks by global sample index (`data.training_source`)
    optimizer: torch.optim.Optimizer
    trainable_names: list[str]
    settings: dict  # cfg as saved in retrofit.json, with its `phases`
    origin: tuple[float, int]  # where the CR ramp starts (`ramp.ramp_origin`)
    start: int  # steps done before this process started
    finished: bool  # a rerun of a finished run, here only to write its final model again
    exports: list[float]  # --export-at CRs not taken yet
    flex: bool  # flex attention for the student
    borrowed: tuple[list, list]  # the neuron variant's borrowed q_proj rows and their original weights

    @property
    def inner(self):
        return self.acc.unwrap_model(self.model)


def retrofit(cfg: RetrofitConfig, progress: bool = True) -> dict:
    """Run (or resume) a retrofit; writes a loadable HF folder to cfg.out. Returns the last metrics ({} when
    nothing was left to do)."""
    run = setup(cfg)
    if run is None:
        return {}
    loop = Loop("retrofit", run.out, cfg.steps, cfg.save_every, cfg.max_minutes, cfg.stop_at, run.acc.is_main_process, progress)
    last = train_loop(loop, run.start, run.optimizer, lambda step: learning_rate(cfg, step), lambda step: train_step(run, step),
                      lambda step: save_checkpoint(run, step), _status, lambda row: take_exports(run, row))
    if last.get("step") == cfg.steps or run.finished:  # finished: a resume that is here to redo a final save cut short
        save_final(run)
    return last


def setup(cfg: RetrofitConfig) -> Run | None:
    """The processes, the student, its teacher, the data, the optimizer and the checkpoint's state, on every
    process. None when the run has nothing left to do (its final model loads, or every --export-at model is taken)."""
    from ..attach import attach_dms
    from ..dms.config import DMSConfig
    from ..loading import device_label

    out = out_folder(cfg.out)
    checkpoints = Checkpoints(out)
    resume_from = checkpoints.resume_point(cfg.resume, "retrofit")
    saved = None if resume_from is None else Checkpoints.load(resume_from)  # (trainable, optimizer, state)
    start = 0 if saved is None else saved[2]["step"]
    settings = _settings_with_phases(out / "retrofit.json", cfg, start)  # read by every process before any write
    origin = ramp_origin(settings)
    acc = _accelerator(cfg)
    finished = start >= cfg.steps  # a rerun of a finished run: nothing to train, its final model to check
    if finished:
        if _final_model_loads(acc, out):
            return None
        if acc.is_main_process:
            print(f"{out} holds no final model that loads (a save cut short?): writing it again from {resume_from}")

    model, tokenizer, teacher, source = _models_and_data(cfg, acc, out)
    attach_dms(model, DMSConfig(window=cfg.window, decision=cfg.decision, target_cr=cfg.target_cr, sinks=cfg.sinks))
    rows = borrowed_rows(model)
    original_rows = [(layer.self_attn.q_proj.weight.detach()[r].clone(),
                      None if layer.self_attn.q_proj.bias is None else layer.self_attn.q_proj.bias.detach()[r].clone())
                     for layer, r in zip(model.model.layers, rows)]
    for name, p in model.named_parameters():
        p.requires_grad_(cfg.train == "all" or ".dms_proj_alpha" in name)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if resume_from is None and cfg.init_from:
        _load_initial_dms_adapter(model, cfg.init_from, out)
    if resume_from is None and cfg.decision == "neuron" and cfg.neuron_decay == "instant":
        _shift_borrowed_rows(model, rows, original_rows, 1.0)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if resume_from is not None:
        restore(trainable, saved[0], saved[2], resume_from)
        if not cfg.fsdp:
            optimizer.load_state_dict(saved[1])
    model.to(acc.device)
    if teacher is not None:
        teacher.to(acc.device)
    model, optimizer = acc.prepare(model, optimizer)
    if resume_from is not None and cfg.fsdp:  # the saved state is the unsharded optimizer's: shard it now
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, _named_optimizer_state(saved[1], list(trainable)),
                                 options=StateDictOptions(full_state_dict=True))
    model.train()

    if acc.is_main_process:
        (out / "retrofit.json").write_text(json.dumps({**settings, "device_name": device_label(acc.device)}, indent=1))
    exports = [x for x in cfg.export_at if ramped_cr(start - 1, settings, origin) < x] if start else list(cfg.export_at)
    if cfg.export_at and not exports and not finished:  # every model this ramp was to give is taken already
        return None
    flex = cfg.attention == "flex" or (cfg.attention == "auto" and acc.device.type == "cuda")
    return Run(cfg, acc, out, checkpoints, model, teacher, tokenizer, source, optimizer, list(trainable), settings, origin,
               start, finished, exports, flex, (rows, original_rows))


def _models_and_data(cfg: RetrofitConfig, acc, out: Path):
    """(base model on the CPU, tokenizer, a frozen copy as teacher with --train all or None, training data).
    One process tokenizes (and has the base write teacher samples, in the training precision: bf16 samples
    ~2x faster on CPU); the others read its cache."""
    from ..attach import dms_config
    from ..loading import load
    from .data import training_source

    model, tokenizer = load(cfg.model, device="cpu", dtype="float32")
    if dms_config(model) is not None:
        raise KVShrinkError(f"{cfg.model} already has DMS; retrofit its base model instead")
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.train == "all" else None
    cache_dir = Path(cfg.data_cache) if cfg.data_cache else out / "data-cache"
    model.to(acc.device)  # teacher samples are generated on the training device
    with acc.autocast():
        source = training_source(cfg.data, tokenizer, cfg.seq_len, cache_dir, teacher=model, seed=cfg.seed) if acc.is_main_process else None
    acc.wait_for_everyone()
    if source is None:
        source = training_source(cfg.data, tokenizer, cfg.seq_len, cache_dir, teacher=model, seed=cfg.seed)
    return model.to("cpu"), tokenizer, teacher, source


def _accelerator(cfg: RetrofitConfig):
    """One Accelerator per process: DDP (or FSDP2) over `accelerate launch` processes, bf16 autocast as --dtype says."""
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    bf16 = bf16_autocast(cfg.dtype, "cpu" if cpu else "cuda")
    try:
        acc = Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", fsdp_plugin=_fsdp_plugin() if cfg.fsdp else None)
    except ValueError as exc:  # accelerate fixes one precision per process
        raise KVShrinkError(f"this process already ran a retrofit in another precision; run this one (--dtype {cfg.dtype}) in a new process") from exc
    if cfg.fsdp and acc.num_processes < 2:
        raise KVShrinkError("--fsdp shards over processes: start it with `accelerate launch --multi_gpu --num_processes N`")
    if cfg.batch_size % (acc.num_processes * cfg.grad_accum):
        raise KVShrinkError(f"--batch-size {cfg.batch_size} must be divisible by processes x --grad-accum = {acc.num_processes * cfg.grad_accum}")
    return acc


def train_step(run: Run, step: int) -> dict:
    """One optimizer step: this process's share of --batch-size sequences in --grad-accum micro-batches, the
    teacher's logits, the student's under seeded Gumbel noise, KL + compression loss, a clipped AdamW update.
    Returns the step's metrics, averaged (tokens: summed) over processes."""
    from .data import PAD

    cfg, acc, model = run.cfg, run.acc, run.model
    world, rank = acc.num_processes, acc.process_index
    local_batch = cfg.batch_size // (world * cfg.grad_accum)
    noise_shape = (run.inner.config.num_hidden_layers, run.inner.config.num_key_value_heads, cfg.seq_len)  # (L, Hkv, T) per sample
    cr_target = ramped_cr(step, run.settings, run.origin)
    flag_target = flag_rate_for(cr_target, cfg.window, cfg.aim_context) if cfg.aim_context else 1.0 - 1.0 / cr_target
    totals = torch.zeros(4, device=acc.device)  # loss, kl, compression loss, flag rate
    tokens = torch.zeros((), device=acc.device)  # real (non-padding) tokens this step
    for micro in range(cfg.grad_accum):
        first = micro * world * local_batch + rank * local_batch
        g_idx = [step * cfg.batch_size + first + i for i in range(local_batch)]
        batch = run.source.batch(g_idx)
        # columns that are padding in every row go (flex keeps the full length: one compiled shape)
        T = cfg.seq_len if run.flex else int(torch.nonzero((batch.ids != PAD).any(0)).max()) + 1
        ids = batch.ids[:, :T].to(acc.device)
        live = ids != PAD  # (B, T): padding after a block's document counts in no loss
        ids = ids.clamp(min=0)  # any real id: causal attention keeps padding out of earlier positions
        uniform = noise_for(cfg.seed, step, g_idx, noise_shape)[..., :T].to(acc.device)
        tokens += live.sum()
        with torch.no_grad(), acc.autocast():
            teacher_logits = (run.teacher(ids, use_cache=False) if run.teacher is not None
                              else model(ids, use_cache=False, dms_signals=TrainSignals(teacher=True))).logits
        signals = TrainSignals(uniform=uniform, collect=[], flex=run.flex)
        sync = micro == cfg.grad_accum - 1
        with acc.autocast(), (torch.enable_grad() if sync else acc.no_sync(model)):
            student_logits = model(ids, use_cache=False, dms_signals=signals).logits
            kl = kl_student_teacher(student_logits, teacher_logits, token_weights(live, batch.answer_start, cfg.answer_weight))
            flags = torch.stack([c["flags"] for c in signals.collect]).float()  # (L, B, Hkv, T), straight-through
            per_seq = (flags.mean(dim=(0, 2)) * live).sum(-1) / live.sum(-1)
            comp = compression_loss(per_seq, flag_target, cfg.cr_loss,
                                    length_weights(live, cfg.aim_context or 32 * cfg.window) if cfg.cr_by_length else None)
            loss = (kl + comp) / cfg.grad_accum
            acc.backward(loss)
        totals += torch.stack([loss.detach() * cfg.grad_accum, kl.detach(), comp.detach(), per_seq.detach().mean()]) / cfg.grad_accum
    if cfg.grad_clip:
        acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    decay_steps = max(1, int(0.1 * cfg.steps))
    if cfg.decision == "neuron" and cfg.neuron_decay == "linear" and step < decay_steps:
        _shift_borrowed_rows(run.inner, *run.borrowed, 1.0 / decay_steps)
    totals = acc.reduce(totals, reduction="mean")
    tokens = acc.reduce(tokens, reduction="sum")
    flag_rate = float(totals[3])
    return {"loss": float(totals[0]), "kl": float(totals[1]), "compression_loss": float(totals[2]), "flag_rate": flag_rate,
            "target_flag_rate": flag_target, "target_cr": cr_target, "flag_cr": 1.0 / max(1e-9, 1.0 - flag_rate),
            "tokens": int(tokens), "processes": world}


def take_exports(run: Run, metrics: dict) -> str | None:
    """OUT/cr-X for each --export-at X the ramp passed this step; once the last is taken, the run stops."""
    while run.exports and metrics["target_cr"] >= run.exports[0]:
        _export(run, run.exports.pop(0), metrics)
    return "the last --export-at" if run.cfg.export_at and not run.exports else None


def _export(run: Run, cr: float, metrics: dict) -> None:
    """OUT/cr-X: a loadable model at this point of the ramp, labelled DMS-X (atomically: a folder is complete
    or absent), with the step's metrics beside it."""
    from ..loading import quiet_transformers

    if run.acc.is_main_process:
        inner = run.inner

        def write(tmp: Path) -> None:
            ramp_target, inner.config.dms_cr = inner.config.dms_cr, cr
            inner.save_pretrained(tmp, safe_serialization=True)
            inner.config.dms_cr = ramp_target
            run.tokenizer.save_pretrained(tmp)
            (tmp / "export.json").write_text(json.dumps(metrics, indent=1))

        with quiet_transformers():  # no progress bars of its own beside the run's
            write_atomically(run.out / f"cr-{cr:g}", write)
    run.acc.wait_for_everyone()


def save_checkpoint(run: Run, step: int) -> None:
    """Checkpoints always hold the unsharded state (what one process would have), so a run can resume
    with another number of processes, with or without FSDP. Every process takes part."""
    acc = run.acc
    acc.wait_for_everyone()
    if run.cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = _full_model_state(run.model)
        named = get_optimizer_state_dict(run.model, run.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        opt_state = _indexed_optimizer_state(named, run.trainable_names) if acc.is_main_process else None
    else:
        full = dict(run.inner.named_parameters())
        opt_state = run.optimizer.state_dict()
    if acc.is_main_process:
        run.checkpoints.save(step, {n: full[n] for n in run.trainable_names}, opt_state)
    acc.wait_for_everyone()


def save_final(run: Run) -> None:
    """OUT's HF model, its config.json written last (`write_atomically`): a save cut short leaves a folder
    that does not load, which a rerun with --resume writes again."""
    from ..loading import quiet_transformers

    full = _full_model_state(run.model) if run.cfg.fsdp else None  # every process takes part in gathering shards
    if run.acc.is_main_process:
        def write(tmp: Path) -> None:
            run.inner.save_pretrained(tmp, state_dict=full, safe_serialization=True)
            run.tokenizer.save_pretrained(tmp)

        with quiet_transformers():
            write_atomically(run.out, write, commit="config.json")
    run.acc.wait_for_everyone()


def _final_model_loads(acc, out: Path) -> bool:
    """Whether OUT holds a final model that loads (tried by the main process, told to all)."""
    from accelerate.utils import broadcast_object_list

    from ..loading import load

    loads = [True]
    if acc.is_main_process:
        try:
            load(out, device="cpu")
        except KVShrinkError:
            loads = [False]
    return broadcast_object_list(loads)[0]


_BEFORE_A_SETTING_EXISTED = {"sinks": 0}  # how runs recorded before a setting existed ran, where today's default differs


def _settings_with_phases(path: Path, cfg: RetrofitConfig, start_step: int) -> dict:
    """cfg as JSON. A resume that changes the recipe (more steps, another lr, sinks...) keeps the
    settings each earlier stretch of steps ran with under `phases`, so the model card can say so.
    Settings that do not change what is trained (where, how often saved, when stopped) are not compared;
    a setting missing from an older file ran with its default of that time."""
    ignore = {"out", "resume", "max_minutes", "stop_at", "save_every", "device", "device_name", "data_cache", "fsdp", "until_step", "export_at", "attention"}
    new = asdict(cfg)
    saved = json.loads(path.read_text()) if start_step and path.is_file() else {}
    stretches = [*saved.pop("phases", []), saved] if saved else []
    earlier = [p for p in stretches[:-1] if p["until_step"] < start_step]
    # the settings step `start_step` ran with: a rewind may land inside a recorded phase
    ran = next((p for p in stretches[:-1] if p["until_step"] >= start_step), saved)
    ran = {f.name: f.default for f in fields(RetrofitConfig)} | _BEFORE_A_SETTING_EXISTED | ran | {"dtype": recorded_dtype(ran)} if ran else {}
    if ran and any(ran.get(k) != v for k, v in new.items() if k not in ignore):
        earlier.append({**ran, "until_step": start_step})
    return {**new, "phases": earlier} if earlier else new


def _load_initial_dms_adapter(model, init_from: str, out: Path) -> None:
    """Copy a DMS model's eviction-adapter tensors into `model` (a second stage on new data), and keep its
    card for the new one."""
    from ..loading import load_dms_weights
    from ..zoo import folder_of

    folder = folder_of(init_from)
    try:
        load_dms_weights(model, folder)
    except KVShrinkError as exc:
        raise KVShrinkError(f"--init-from {init_from}: {exc}; name an adapter-DMS model of this base (e.g. tiny-dms8)") from exc
    out.mkdir(parents=True, exist_ok=True)
    if (folder / "README.md").is_file():
        (out / "earlier-stage.md").write_text((folder / "README.md").read_text())


def _shift_borrowed_rows(model, rows, original_rows, fraction: float) -> None:
    """Remove `fraction` of the borrowed q_proj rows' original weights and biases, keeping what training added."""
    with torch.no_grad():
        for layer, r, (weight, bias) in zip(model.model.layers, rows, original_rows):
            q = layer.self_attn.q_proj
            q.weight[r] -= fraction * weight.to(q.weight.device)
            if bias is not None:
                q.bias[r] -= fraction * bias.to(q.bias.device)


def _fsdp_plugin():
    """FSDP2, one shard unit per decoder layer (the model's `_no_split_modules`)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")


def _full_model_state(model) -> dict:
    """The unsharded state dict of an FSDP model: a collective (every process calls it; the main one gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _named_optimizer_state(indexed: dict, names: list[str]) -> dict:
    """Plain `optimizer.state_dict()` (parameters by position) -> the same keyed by parameter name."""
    return {"state": {names[i]: s for i, s in indexed["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]}


def _indexed_optimizer_state(named: dict, names: list[str]) -> dict:
    position = {n: i for i, n in enumerate(names)}
    return {"state": {position[n]: s for n, s in named["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in named["param_groups"]]}


def _status(m: dict) -> str:
    return (f"loss {m['loss']:.4f}  KL {m['kl']:.4f}  evict {m['flag_rate']:.3f}/{m['target_flag_rate']:.3f} "
            f"(CR {m['flag_cr']:.2f}/{m['target_cr']:.2f})  {m['tokens_per_second']:.0f} tok/s")


def plot_training(run_dir: str | Path) -> Path:
    """PNG of loss/KL and achieved (flag-based) vs target CR from `run_dir/metrics.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise KVShrinkError(f"{path} not found: is {run_dir} a retrofit output folder?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise KVShrinkError(f"{path} is empty")
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [r["loss"] for r in rows], label="loss")
    a.plot(steps, [r["kl"] for r in rows], label="KL(student||teacher)")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.legend()
    b.plot(steps, [r["flag_cr"] for r in rows], label="achieved 1/(1-flag rate)")
    b.plot(steps, [r["target_cr"] for r in rows], label="target CR", linestyle="--")
    b.plot(steps, [1 / max(1e-9, 1 - r["target_flag_rate"]) for r in rows], label="aimed 1/(1-target flag)", linestyle=":")
    b.set_xlabel("step")
    b.legend()
    fig.tight_layout()
    png = Path(run_dir) / "training.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


__all__ = ["RetrofitConfig", "default_sinks", "plot_training", "retrofit", "setup", "train_step", "save_final"]
