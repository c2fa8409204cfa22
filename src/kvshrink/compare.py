"""Two models (typically vanilla vs DMS) continuing the same passage: cost side by side, and how long
their greedy continuations agree."""

from __future__ import annotations

from pathlib import Path

from .errors import KVShrinkError


def leading_agreement(a: list[int], b: list[int]) -> int:
    """Number of leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(model_a: str, model_b: str, text_file: Path, prompt_tokens: int = 1024, max_new_tokens: int = 64,
            device: str = "auto", dtype: str = "auto") -> dict:
    from .generation import generate_ids
    from .loading import load
    from .policies import for_model
    from .prompts import read_text_file

    passage = read_text_file(Path(text_file))
    runs = {}
    prompt = None
    if prompt_tokens < 1 or max_new_tokens < 1:
        raise KVShrinkError(f"--prompt-tokens and --max-new-tokens must be >= 1 (got {prompt_tokens}, {max_new_tokens})")
    vocab = None
    for name in (model_a, model_b):
        model, tok = load(name, device=device, dtype=dtype)
        if vocab is not None and tok.get_vocab() != vocab:
            raise KVShrinkError(f"{model_a} and {model_b} use different tokenizers; compare a model with its own DMS retrofit")
        vocab = tok.get_vocab()
        if prompt is None:
            ids = tok(passage)["input_ids"]
            if len(ids) < 2:
                raise KVShrinkError(f"{text_file} holds no text")
            prompt = ids[:prompt_tokens]
        tokens, stats, _ = generate_ids(model, [prompt], for_model(model), max_new_tokens=max_new_tokens)
        runs[name] = {"tokens": tokens[0], "text": tok.decode(tokens[0], skip_special_tokens=True), "stats": stats}
    a, b = runs[model_a], runs[model_b]
    return {"prompt_tokens": len(prompt), "agreement": leading_agreement(a["tokens"], b["tokens"]), "runs": runs}
