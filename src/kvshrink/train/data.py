"""Retrofit data: text in, packed token blocks out, tokenized once and cached.

Sources (`--data`):
- a text file (any extension but .jsonl), a `.jsonl` file (field "text", or "prompt" + "response"),
- a folder of such files (read in sorted order), or a folder written by `datasets.save_to_disk`,
- `teacher:FILE`: one prompt per line of FILE; the teacher writes the continuations, which are cached with
  the blocks. (The authors' release does not distil on the teacher's outputs: it uses fixed reasoning traces
  written by another model, off-policy, as `gold:` and `stdlib` are here.)
- `task:NAME[,NAME...][:N]`: N generated problems per task (`kvshrink.tasks`, training seeds), chat-
  formatted, answered by the teacher in the same way.
- `passkey:N[:CONTEXT]`: N chat prompts of CONTEXT tokens (default: the block length) hiding a 5-digit key
  in the *train* half of the Python docs (`kvshrink.corpora`), answered by the teacher: retrieval-shaped
  data, so that the KL on the answer penalizes evicting the key.
- `pydoc`: the train half of CPython's documentation topics (`kvshrink.corpora`), as plain text: prose
  that ships with Python, so a recipe that names it runs anywhere.
- `stdlib`: the Python standard library's own `*.py` source (tests excluded), minus a fixed tenth of its
  top-level modules held out for evaluation (`stdlib_files`): ~3.5M tokens of real code on any machine.
- `gold:NAME[,NAME...]`: a fresh generated problem for every sample drawn, with its gold worked solution
  (`ProblemStream`): never repeated, off-policy as the release's traces are, no teacher sampling.
- `A+B+...`: the blocks of several sources together (e.g. `teacher:prompts.txt+passkey:128`).
Documents are joined with the EOS token and cut into blocks of `seq_len` tokens (the tail is dropped).
Task and passkey documents get a block each instead (`pack_whole`): an answer must sit in the same block as
the facts it retrieves, or distillation never rewards keeping them; and a problem then starts at position 0,
as at inference (sinks included), instead of after other problems it could attend to. PAD (-1) fills the
block after its document; the retrofit skips padding columns and counts padding in no loss.
Each block also records where its answer starts (the teacher's continuation; the block's end for plain
text), so that the retrofit can weight the KL on answers (`--answer-weight`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KVShrinkError
from ..prompts import chat_prompt, pad_token_id
from ..shims import cache_arg

PAD = -1  # block filler after the last whole document: not a token, masked out of every loss
ANSWER_TOKENS = {"task": 256, "passkey": 32}  # caps on the teacher's answers, so that one rambling sample cannot hold its batch for seq_len new tokens
GENERATED = ("task:", "passkey:")  # sources made of generated prompts + teacher answers, packed whole
PYDOC = "pydoc"
STDLIB = "stdlib"
GOLD = "gold:"
STDLIB_HELD_OUT = 10  # one top-level stdlib module in 10 (by a hash of its name) is held out
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
TRAIN_SEED = 1_000_000  # task problems for training use seeds from here; evaluation's stay below
TEXT_SUFFIXES_SKIP = {".safetensors", ".bin", ".pt", ".png", ".jpg", ".gz", ".zip", ".arrow", ".parquet"}


def read_documents(src: str) -> list[str]:
    path = Path(src)
    if not path.exists():
        raise KVShrinkError(f"--data {src!r} not found: give a text/jsonl file, a folder of them, or teacher:FILE")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return _read_hf_dataset(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in TEXT_SUFFIXES_SKIP)
        docs = [d for f in files for d in read_documents(str(f))]
    elif path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KVShrinkError(f"{path}:{n} is not valid JSON ({exc.msg}); one JSON object per line") from exc
            text = row.get("text") or (row.get("prompt", "") + row.get("response", ""))
            if text:
                docs.append(text)
    else:
        docs = [_read_text(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise KVShrinkError(f"--data {src!r} holds no text")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KVShrinkError(f"cannot read {path} as UTF-8 text: {exc}") from exc


def _read_hf_dataset(path: Path) -> list[str]:
    try:
        from datasets import load_from_disk
    except ImportError as exc:
        raise KVShrinkError("reading a datasets folder needs the `datasets` package: pip install datasets") from exc
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take the train split, else the first
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    if "text" not in ds.column_names:
        raise KVShrinkError(f"{path}: the dataset has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])


@dataclass(frozen=True)
class Blocks:
    """Training blocks: ids (N, seq_len) with PAD after a block's document, and answer_start (N,): the
    position where the block's answer begins (seq_len: no answer, plain text). Indexing selects blocks."""

    ids: torch.Tensor
    answer_start: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index) -> Blocks:
        return Blocks(self.ids[index], self.answer_start[index])

    @classmethod
    def cat(cls, parts: list[Blocks]) -> Blocks:
        return cls(torch.cat([p.ids for p in parts]), torch.cat([p.answer_start for p in parts]))


def pack(token_docs: list[list[int]], eos: int | None, seq_len: int) -> Blocks:
    stream: list[int] = []
    for doc in token_docs:
        stream.extend(doc)
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise KVShrinkError(f"the data has {len(stream)} tokens, fewer than one block of --seq-len {seq_len}")
    return Blocks(torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len), torch.full((n,), seq_len))


def pack_whole(token_docs: list[list[int]], eos: int | None, seq_len: int, prompt_lengths: list[int] | None = None) -> Blocks:
    """One document (+ EOS) per block, filled up with PAD; a document longer than a block is cut to its
    first seq_len tokens. A document's answer starts after its prompt (`prompt_lengths`, in tokens)."""
    if not token_docs:
        raise KVShrinkError("the data holds no documents")
    docs = [(doc + ([eos] if eos is not None else []))[:seq_len] for doc in token_docs]
    starts = [seq_len] * len(docs) if prompt_lengths is None else [min(n, seq_len) for n in prompt_lengths]
    return Blocks(torch.tensor([doc + [PAD] * (seq_len - len(doc)) for doc in docs], dtype=torch.long), torch.tensor(starts))


def teacher_documents(prompts: list[str], model, tokenizer, max_new_tokens: int, seed: int, progress_file: Path | None = None) -> list[str]:
    """Prompts + the teacher's own sampled continuations (temperature 1), with transformers' generate:
    the teacher is the vanilla model, and its generate loop is the fastest one available for it.

    progress_file: finished documents are appended there batch by batch (jsonl), so an interrupted
    run picks up where it stopped instead of sampling everything again.
    """
    import torch
    from transformers import DynamicCache

    docs = []
    if progress_file is not None and progress_file.exists():
        docs = [json.loads(line)["text"] for line in progress_file.read_text().splitlines() if line.strip()]
    pad = pad_token_id(tokenizer)
    batch_size = 16
    for i in range(len(docs), len(prompts), batch_size):  # batches are saved whole: resume after the last
        device = next(model.parameters()).device
        torch.manual_seed(seed + i)  # per batch, so a resumed run samples what an uninterrupted one would
        batch = [tokenizer(p)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(len(b) for b in batch)
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                 top_k=0, pad_token_id=pad, **cache_arg(DynamicCache(config=model.config)))
        new = [p + tokenizer.decode(o[width:], skip_special_tokens=True) for p, o in zip(prompts[i:i + batch_size], out)]
        docs = docs[:i] + new
        if progress_file is not None:
            progress_file.parent.mkdir(parents=True, exist_ok=True)
            with open(progress_file, "a") as fh:
                fh.write("".join(json.dumps({"text": d}) + "\n" for d in new))
    return docs


def weights_fingerprint(model) -> str:
    """A hash of every weight (cast to fp16): teacher samples belong to the exact model that wrote them."""
    digest = hashlib.blake2b(digest_size=8)
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_key(src: str, tokenizer, seq_len: int, seed: int, teacher=None) -> str:
    """Cache key of a data source: its spec, the tokenizer, the block length, its files' stamps and, for
    sources the teacher writes, the teacher's weights (a re-tuned base must not reuse old samples)."""
    stamp = [src, seq_len, getattr(tokenizer, "name_or_path", ""), len(tokenizer), seed, "whole" if src.startswith(GENERATED) else "stream"]
    if src.startswith(GENERATED + ("teacher:",)):
        if teacher is None:
            raise KVShrinkError(f"--data {src} is written by the teacher: give the teacher model")
        stamp.append(weights_fingerprint(teacher))
    if not src.startswith(GENERATED) and src not in (PYDOC, STDLIB):
        path = Path(src[len("teacher:"):] if src.startswith("teacher:") else src)
        for f in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if f.is_file():
                st = f.stat()
                stamp += [str(f), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def task_prompts(spec: str, tokenizer, seed: int) -> list[str]:
    """`NAME[,NAME...][:N]` -> N chat-formatted problems per task (default 64), from training seeds
    (TRAIN_SEED + seed), which evaluation's seeds (< TRAIN_SEED) never reach."""
    from ..tasks import make_problems

    names, _, count = spec.partition(":")
    if count and not count.isdigit():
        raise KVShrinkError(f"--data task:{spec}: give task:NAME[,NAME...][:N] with N a number of problems")
    n = int(count) if count else 64
    problems = [p for name in names.split(",") for p in make_problems(name.strip(), n, seed=TRAIN_SEED + seed)]
    return [chat_prompt(tokenizer, p.prompt, tokenize=False) for p in problems]


def passkey_prompts(spec: str, tokenizer, seq_len: int, seed: int) -> list[str]:
    """`N[:CONTEXT]` -> N chat-formatted passkey prompts with filler from the train half of the Python docs,
    CONTEXT tokens including a 32-token answer (default seq_len: prompt and answer share a block)."""
    from ..corpora import passkey_prompt, pydoc_split

    count, _, context = spec.partition(":")
    if not count.isdigit() or (context and not context.isdigit()):
        raise KVShrinkError(f"--data passkey:{spec}: give passkey:N[:CONTEXT] with numbers (e.g. passkey:128:1024)")
    n, context = int(count), int(context) if context else seq_len
    filler = tokenizer(pydoc_split()[0])["input_ids"]
    return [tokenizer.decode(passkey_prompt(tokenizer, filler, context, TRAIN_SEED + seed * n + i)[0]) for i in range(n)]


def token_blocks(src: str, tokenizer, seq_len: int, cache_dir: Path, teacher=None, seed: int = 0) -> Blocks:
    """Blocks of seq_len tokens for `src` (PAD after the last whole document of a task or passkey block),
    cached in `cache_dir` by source, tokenizer, length and (for generated sources) teacher."""
    if "+" in src:
        return Blocks.cat([token_blocks(part, tokenizer, seq_len, cache_dir, teacher, seed) for part in src.split("+")])
    kind, _, rest = src.partition(":") if src.startswith(GENERATED + ("teacher:",)) else ("", "", src)
    if not src.startswith(GENERATED) and src not in (PYDOC, STDLIB) and not Path(rest).exists():
        raise KVShrinkError(f"--data {rest!r} not found: give a text/jsonl file, a folder of them, pydoc, teacher:FILE, task:NAME or passkey:N")
    key = data_key(src, tokenizer, seq_len, seed, teacher)
    cache_file = cache_dir / f"blocks2-{key}.pt"  # blocks-*.pt had no answer starts, data-*.pt packed several documents per block
    if cache_file.exists():
        return Blocks(**torch.load(cache_file))
    if kind:
        if kind == "task":
            prompts = task_prompts(rest, tokenizer, seed)
        elif kind == "passkey":
            prompts = passkey_prompts(rest, tokenizer, seq_len, seed)
        else:
            prompts = [p for p in _read_text(Path(rest)).splitlines() if p.strip()]
            if not prompts:
                raise KVShrinkError(f"{rest} holds no prompts (one per line)")
        docs = teacher_documents(prompts, teacher, tokenizer, max_new_tokens=ANSWER_TOKENS.get(kind, seq_len), seed=seed,
                                 progress_file=cache_dir / f"teacher-{key}.partial.jsonl")
    elif src == PYDOC:
        from ..corpora import pydoc_split

        docs = [pydoc_split()[0]]
    elif src == STDLIB:
        docs = [d for f in stdlib_files("train") if (d := _read_code(f))]
    else:
        docs = read_documents(rest)
    token_docs = [tokenizer(d)["input_ids"] for d in docs]
    if src.startswith(GENERATED):
        blocks = pack_whole(token_docs, tokenizer.eos_token_id, seq_len, [len(tokenizer(p)["input_ids"]) for p in prompts])
    else:
        blocks = pack(token_docs, tokenizer.eos_token_id, seq_len)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    torch.save(vars(blocks), tmp)
    tmp.replace(cache_file)
    return blocks


def stdlib_files(split: str = "train") -> list[Path]:
    """The running Python's standard-library `*.py` files (tests excluded), split by top-level module: a
    module is held out when a hash of its name falls in one bucket of STDLIB_HELD_OUT, so the split of a
    module does not change between Python versions."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not STDLIB_SKIP & set(p.relative_to(root).parts))

    def held(path: Path) -> bool:
        top = path.relative_to(root).parts[0].removesuffix(".py")
        return int(hashlib.sha256(top.encode()).hexdigest(), 16) % STDLIB_HELD_OUT == 0

    return [p for p in files if held(p) == (split == "heldout")]


def _read_code(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # a few stdlib files are Latin-1 test data: skip them
        return ""


class ShuffledBlocks:
    """Fixed blocks drawn in a seeded random order, one epoch after another."""

    def __init__(self, blocks: Blocks, seed: int):
        self.blocks = blocks
        self.order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))

    def batch(self, indices: list[int]) -> Blocks:
        return self.blocks[self.order[torch.tensor(indices) % len(self.blocks)]]

    def distinct_tokens(self) -> int:
        return int((self.blocks.ids != PAD).sum())


class ProblemStream:
    """`gold:NAME[,NAME...]`: sample i is problem i // n of task i % n (training seeds, default difficulty),
    its chat prompt followed by its gold worked solution: a fresh problem for every sample, never repeated."""

    def __init__(self, names: list[str], tokenizer, seq_len: int, seed: int):
        from ..tasks import task_module

        for name in names:
            task_module(name)  # unknown names fail here, before any training
        self.names, self.tokenizer, self.seq_len, self.seed = names, tokenizer, seq_len, seed

    def batch(self, indices: list[int]) -> Blocks:
        from ..tasks import make_problems

        docs, prompt_lengths = [], []
        for g in indices:
            name = self.names[g % len(self.names)]
            problem = make_problems(name, 1, seed=TRAIN_SEED + self.seed, first=g // len(self.names))[0]
            prompt = chat_prompt(self.tokenizer, problem.prompt)
            docs.append(prompt + self.tokenizer(problem.solution)["input_ids"])
            prompt_lengths.append(len(prompt))
        return pack_whole(docs, self.tokenizer.eos_token_id, self.seq_len, prompt_lengths)

    def distinct_tokens(self) -> None:
        return None  # unbounded


def training_source(src: str, tokenizer, seq_len: int, cache_dir: Path, teacher=None, seed: int = 0):
    """What the retrofit draws its samples from: `.batch(global sample indices) -> Blocks`."""
    if src.startswith(GOLD):
        names = [n.strip() for n in src[len(GOLD):].split(",") if n.strip()]
        if not names or "+" in src:
            raise KVShrinkError(f"--data {src}: give gold:NAME[,NAME...] alone (a fresh problem stream joins no other source)")
        return ProblemStream(names, tokenizer, seq_len, seed)
    return ShuffledBlocks(token_blocks(src, tokenizer, seq_len, cache_dir, teacher=teacher, seed=seed), seed)
