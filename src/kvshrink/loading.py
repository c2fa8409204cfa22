"""Loading a model by folder: any local HF checkpoint of a supported family; DMS comes back attached."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .attention import install
from .dms.config import DMSConfig
from .errors import KVShrinkError
from .shapes import check_family

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise KVShrinkError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KVShrinkError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KVShrinkError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) visible (cuda:0 ...)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA, unless asked otherwise."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if not isinstance(dtype, torch.dtype) and dtype not in names:
        raise KVShrinkError(f"unknown dtype {dtype!r}: use one of {', '.join(names)}")
    dtype = names.get(dtype, dtype)
    if dtype == torch.bfloat16 and device.type == "cpu":
        warn_if_slow_cpu_bf16("--dtype bfloat16", "--dtype float32")
    return dtype


def device_label(device: torch.device) -> str:
    """How run records name the device: the GPU's name, or the CPU and its torch threads."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX, through oneDNN): ~3x fp32's
    speed there, while elsewhere torch's bfloat16 matmul may be far slower than fp32's."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except AttributeError:  # private helpers that another torch may lack
        return False


def warn_if_slow_cpu_bf16(asked: str, instead: str) -> None:
    """bf16 on a CPU without native bf16 runs every matmul in emulation: 43x slower than fp32 for a
    SmolLM2-sized one on an AVX2 CPU with torch 2.13. Say so once, where the user asked for it."""
    if not cpu_has_fast_bf16():
        warnings.warn(f"{asked} on this CPU (no AVX512-BF16 or AMX: {torch.backends.cpu.get_cpu_capability()}) runs matmuls "
                      f"in emulation, often many times slower than float32; use {instead}", stacklevel=3)


def check_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise KVShrinkError(f"model {str(path)!r} not found: {_which_model()}")
    if not (path / "config.json").is_file():
        raise KVShrinkError(f"{path} has no config.json: is it a Hugging Face model folder?")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise KVShrinkError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")


def _which_model() -> str:
    from .zoo import shipped_names

    return f"give a local Hugging Face model folder (config.json + weights) or a shipped name ({', '.join(shipped_names())})"


def load_dms_weights(model, path: Path) -> None:
    """Copy the DMS adapter tensors (`...self_attn.dms_proj_alpha*`) from a checkpoint folder into `model`.

    transformers does not know these names and skips them when it loads the base model.
    """
    from safetensors import safe_open

    wanted = {name: p for name, p in model.named_parameters() if ".dms_proj_alpha" in name}
    found = set()
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = key if key in wanted else next((n for n in wanted if key.endswith(n)), None)
                    if name is not None:
                        tensor = f.get_tensor(key)
                        if tensor.shape != wanted[name].shape:
                            raise KVShrinkError(f"{file}: {key} has shape {tuple(tensor.shape)}, the model needs "
                                                f"{tuple(wanted[name].shape)}: this adapter belongs to another base model")
                        with torch.no_grad():
                            wanted[name].copy_(tensor)
                        found.add(name)
        except KVShrinkError:
            raise
        except Exception as exc:  # a truncated or corrupt file
            raise KVShrinkError(f"cannot read {file}: {exc}; the checkpoint is corrupt, re-save or re-download it") from exc
    missing = set(wanted) - found
    if missing:
        raise KVShrinkError(f"{path}: the config says DMS adapter, but {len(missing)} adapter tensors are missing (e.g. {sorted(missing)[0]})")


def merge_lora(model, folder: Path):
    """Apply a peft LoRA adapter and merge it into the weights: the result is a plain model again."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise KVShrinkError("this model ships a LoRA adapter, which needs the `peft` package: pip install peft") from exc
    try:
        with warnings.catch_warnings():  # peft reads a property transformers has renamed: not the user's concern
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except Exception as exc:  # a truncated or corrupt adapter file
        raise KVShrinkError(f"cannot apply the LoRA adapter in {folder}: {_first_line(exc)}") from exc


def resolve_model(name_or_path: str | Path) -> Path:
    """A shipped base's name (e.g. 'smollm2') -> its folder; anything else is a local folder path."""
    from .zoo import BASES

    if str(name_or_path) in BASES and not Path(name_or_path).exists():
        return BASES[str(name_or_path)]()
    return Path(name_or_path)


@contextmanager
def quiet_transformers():
    """transformers' log lines and progress bars off: errors reach the user as one line of ours, and the
    DMS adapter keys, "unexpected" to HF, are loaded by us (`load_dms_weights`)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load(name_or_path: str | Path, device: str | None = "auto", dtype: str | torch.dtype | None = "auto"):
    """Load a model and its tokenizer, with kvshrink's attention installed and DMS attached if configured.

    Returns (model, tokenizer); the model is in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .attach import attach_dms
    from .zoo import MODELS_DIR, adapter_names, adapter_spec

    if not str(name_or_path).strip():
        raise KVShrinkError(f"the model name is empty: {_which_model()}")
    if str(name_or_path) in adapter_names() and not Path(name_or_path).exists():  # a shipped adapter
        folder = MODELS_DIR / str(name_or_path)
        spec = adapter_spec(str(name_or_path))
        model, tokenizer = load(spec["base"], device=device, dtype=dtype)
        if spec.get("lora"):
            model = merge_lora(model, folder / spec["lora"])
        if spec.get("dms"):
            attach_dms(model, DMSConfig(**spec["dms"]))
            load_dms_weights(model, folder)
        return model.eval(), tokenizer
    path = resolve_model(name_or_path)
    check_model_folder(path)
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path)
        except (ValueError, KeyError, OSError) as exc:
            raise KVShrinkError(f"cannot read {path}/config.json: {_first_line(exc)}") from exc
        check_family(config)
        try:
            dms = DMSConfig.from_hf(config)
        except KVShrinkError as exc:
            raise KVShrinkError(f"{path}/config.json: {exc}") from exc
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # no tokenizer files, or unreadable ones
            raise KVShrinkError(f"{path} has no tokenizer that loads ({_first_line(exc)}): copy the tokenizer files "
                                "(tokenizer.json, tokenizer_config.json, ...) of its base model into it") from exc
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
        except Exception as exc:  # a corrupt or truncated checkpoint surfaces as many exception types
            raise KVShrinkError(f"cannot load {path}: {_first_line(exc)}; if it is a cache folder, delete it and retry") from exc
    install(model)
    if dms is not None:
        attach_dms(model, dms)
        if dms.decision == "adapter":
            load_dms_weights(model, path)
    return model.to(dev).eval(), tokenizer


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
