"""A toy corpus and a tiny base model trained on it, for checking a retrofit in seconds.

Each sentence is a topic word followed by 15 words drawn from that topic's 4: predicting a word needs
the sentence's topic, up to 16 tokens back. A model that attends to it reaches ~1.39 nats/token (the
ideal is ~1.36); one that loses it pays ~ln(40/4) more. So what a DMS model evicts matters, and an
informed eviction (keep the topic words) can be told apart from a blind one.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

TOPICS = [f"t{i}" for i in range(10)]
WORDS = [f"w{i}" for i in range(40)]
SEQ = 320


def corpus(seed: int, n_sentences: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        t = rng.randrange(len(TOPICS))
        out.append(" ".join([TOPICS[t], *(WORDS[4 * t + rng.randrange(4)] for _ in range(15)), "."]))
    return " ".join(out)


def build_toy_base(path: Path, steps: int = 150, seed: int = 0) -> Path:
    """Train a 2-layer Llama (d=64) on the corpus and save it with a word-level tokenizer to `path`.
    Also writes `train.txt` and `heldout.txt` beside it (different seeds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>", "."] + TOPICS + WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(hf_tok(corpus(seed, 1500))["input_ids"])
    blocks = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (8,), generator=g)]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    (path.parent / "train.txt").write_text(corpus(seed + 1, 1500))
    (path.parent / "heldout.txt").write_text(corpus(seed + 2, 500))
    return path
