"""User-facing errors: one line that names the problem and the fix; the CLI turns them into exit code 2.

Library code names parameters (cr, window=64); the CLI shows them as its flags (--cr, --window 64)."""

import os
from pathlib import Path


class KVShrinkError(ValueError):
    """Bad input or an unusable model/checkpoint. The message is shown to the user as-is."""


def example(flag: str, value) -> str:
    """How to pass `value`: as a flag (`--cr 8`) or as a parameter (`cr=8`)."""
    return f"{flag} {value}" if flag.startswith("-") else f"{flag}={value}"


def check_cr(cr: float | None, flag: str = "cr") -> None:
    """A compression ratio is a finite number >= 1 (None: not given)."""
    if cr is not None and not (1 <= cr < float("inf")):
        raise KVShrinkError(f"{flag} must be >= 1 (got {cr}); 1 means no compression, e.g. {example(flag, 8)}")


def check_prefill_chunk(chunk: int, flag: str = "--prefill-chunk") -> None:
    """Prompt tokens per forward: an integer >= 1."""
    if not isinstance(chunk, int) or chunk < 1:
        raise KVShrinkError(f"{flag} must be >= 1, a whole number of tokens (got {chunk}); e.g. {flag} 256")


def check_sinks(sinks: int | None, flag: str = "sinks") -> None:
    """Sinks (never-evicted first tokens) are an integer >= 0 (None: not given)."""
    if sinks is not None and (not isinstance(sinks, int) or sinks < 0):
        raise KVShrinkError(f"{flag} must be >= 0, a whole number of tokens (got {sinks}); e.g. {example(flag, 4)}")


def check_window(window: int | None, flag: str = "window") -> None:
    """A delayed-eviction window is an integer >= 0 (None: not given)."""
    if window is not None and (not isinstance(window, int) or window < 0):
        raise KVShrinkError(f"{flag} must be >= 0, a whole number of tokens (got {window}); 0 evicts at once, e.g. {example(flag, 64)}")


def out_folder(path: str | Path, flag: str = "--out") -> Path:
    """The folder to write to, made if new: refused before hours of work, not at the first save after them."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there, a file above it, or no permission
        reason = exc.strerror
    else:
        if os.access(path, os.W_OK | os.X_OK):
            return path
        reason = "not writable"
    raise KVShrinkError(f"{flag} {path}: cannot write a folder there ({reason}); name a new or writable folder")
