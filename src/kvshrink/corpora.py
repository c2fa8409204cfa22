"""Real English text that ships with CPython: the Python documentation topics (`pydoc_data.topics`).

Passkey prompts (`passkey_prompt`) hide a 5-digit key in this text: evaluation cuts the filler from the
held-out part, the retrofit's retrieval data (`--data passkey:N`) from the train part.

Split (deterministic, documented): the topics sorted by name; odd-indexed topics are held out, even-
indexed ones are train (61,785 train and 51,322 held-out tokens with the SmolLM2 tokenizer: held-out
measurements need >= 50K). Topics are documents joined by blank lines. Teacher prompts are cut from
the train part only: consecutive `prompt_tokens`-token windows of the train text, decoded back to text.
"""

from __future__ import annotations

import random
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


def passkey_prompt(tok, filler_ids: list[int], context: int, trial: int, answer_tokens: int = 32) -> tuple[list[int], str]:
    """(chat prompt ids of context - answer_tokens tokens hiding a 5-digit key at a random depth, the key).
    Deterministic in (context, trial); the filler is a random window of `filler_ids`."""
    rng = random.Random(context * 100_003 + trial)
    key = str(rng.randint(10_000, 99_999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\n\nWhat is the pass key? Answer with the number only."
    intro = "There is a pass key hidden inside the text below. Find it and remember it.\n\n"
    shell = len(tok.apply_chat_template([{"role": "user", "content": intro + needle + question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))
    n_filler = context - answer_tokens - shell
    start = rng.randrange(0, len(filler_ids) - n_filler)
    filler = filler_ids[start:start + n_filler]
    depth = rng.randrange(0, n_filler + 1)
    text = intro + tok.decode(filler[:depth]) + needle + tok.decode(filler[depth:]) + question
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
    return ids[-(context - answer_tokens):] if len(ids) > context - answer_tokens else ids, key
