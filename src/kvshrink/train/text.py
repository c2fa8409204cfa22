"""Real English text that ships with CPython: the Python documentation topics (`pydoc_data.topics`).

Split (deterministic, documented): the topics sorted by name; odd-indexed topics are held out, even-
indexed ones are train (61,785 train and 51,322 held-out tokens with the SmolLM2 tokenizer: held-out
measurements need >= 50K). Topics are documents joined by blank lines. Teacher prompts are cut from
the train part only: consecutive `prompt_tokens`-token windows of the train text, decoded back to text.
"""

from __future__ import annotations

from pathlib import Path


def pydoc_split() -> tuple[str, str]:
    """(train text, held-out text)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    names = sorted(topics)
    train = [topics[n] for i, n in enumerate(names) if i % 2 == 0]
    held = [topics[n] for i, n in enumerate(names) if i % 2 == 1]
    return "\n\n".join(train), "\n\n".join(held)


def write_pydoc_data(out: Path, tokenizer, n_prompts: int = 256, prompt_tokens: int = 256) -> dict:
    """Write train.txt, heldout.txt and prompts.txt (one teacher prompt per line) to `out`."""
    train, held = pydoc_split()
    out.mkdir(parents=True, exist_ok=True)
    write_if_changed(out / "train.txt", train)
    write_if_changed(out / "heldout.txt", held)
    ids = tokenizer(train)["input_ids"]
    stride = max(prompt_tokens, (len(ids) - prompt_tokens) // max(1, n_prompts))
    prompts = []
    for start in range(0, len(ids) - prompt_tokens, stride)[:n_prompts]:
        text = tokenizer.decode(ids[start:start + prompt_tokens]).replace("\n", " ").strip()
        prompts.append(text)
    write_if_changed(out / "prompts.txt", "\n".join(prompts) + "\n")
    return {"train_tokens": len(ids), "heldout_tokens": len(tokenizer(held)["input_ids"]), "prompts": len(prompts)}


def write_if_changed(path: Path, text: str) -> None:
    """Leave an identical file untouched: data caches are keyed by file stamps, so rewriting would
    make a rerun miss its cache (and an interrupted teacher sampling its saved progress)."""
    if not (path.exists() and path.read_text() == text):
        path.write_text(text)
