"""`kvshrink demo`: the DMS cache's mechanics on a random-init model (until the task-tuned zoo ships).

Same model, same prompt, two caches: vanilla (keeps everything) and DMS with decisions forced to
evict 7 of 8 tokens behind a 16-token window. What it shows is real: bytes the cache allocated, KV
reads, live tokens and decode speed. What it does not show is accuracy (the weights are random).
"""

from __future__ import annotations

from pathlib import Path

import torch

MECHANICS_LABEL = "MECHANICS ONLY: random-init Llama, DMS decisions forced to evict 7/8 tokens (w=16); no accuracy claim"


def tiny_llama(layers: int = 4, hidden: int = 256, heads: int = 4, kv_heads: int = 2, vocab: int = 1000, max_pos: int = 8192, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos)
    return LlamaForCausalLM(config).eval()


def run_mechanics_demo(quick: bool = False, out_dir: Path = Path("demo-output"), device: str = "auto") -> dict:
    import copy

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .attention import install
    from .dms.attach import attach_dms
    from .dms.config import DMSConfig
    from .generation import generate_ids
    from .loading import resolve_device
    from .policies import CachePolicy, DMSPolicy

    console = Console()
    console.print(f"[bold yellow]{MECHANICS_LABEL}[/]")
    dev = resolve_device(device)
    prompt_len, new_tokens = (64, 8) if quick else (2048, 128)
    base = install(tiny_llama()).to(dev)
    dms_model = attach_dms(copy.deepcopy(base), DMSConfig(window=16, forced_keep_every=8))
    prompt = torch.randint(0, base.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating", total=2)
        for name, model, policy in (("vanilla", base, CachePolicy()), ("dms (forced 8x)", dms_model, DMSPolicy(16))):
            _, stats, _ = generate_ids(model, [prompt], policy, max_new_tokens=new_tokens)
            runs[name] = stats
            progress.advance(task)
    table = Table(title=f"prompt {prompt_len} tokens, {new_tokens} generated")
    for col in ("cache", "kv_reads", "peak_kv_tokens", "cache_bytes", "compression_ratio", "decode tok/s"):
        table.add_column(col, justify="right")
    for name, s in runs.items():
        table.add_row(name, f"{s['kv_reads']:,.0f}", f"{s['peak_kv_tokens']:,.0f}", f"{s['cache_bytes']:,}",
                      f"{s['compression_ratio']:.2f}", f"{s['decode_tokens_per_second']:.1f}")
    console.print(table)

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = list(runs)
    for ax, key in zip(axes, ("kv_reads", "cache_bytes", "decode_tokens_per_second")):
        ax.bar(names, [runs[n][key] for n in names], color=["tab:gray", "tab:green"])
        ax.set_title(key)
    fig.suptitle(MECHANICS_LABEL, fontsize=8)
    fig.tight_layout()
    png = out_dir / "demo.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    console.print(f"plot written to {png}")
    return runs
