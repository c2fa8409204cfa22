"""Text -> the token ids a model expects: instruct models through their chat template, base models as-is."""

from __future__ import annotations

from pathlib import Path

from .errors import KVShrinkError


def chat_prompt(tokenizer, messages: str | list[dict], tokenize: bool = True) -> list[int] | str:
    """`messages` ([{role, content}, ...] or one user text) ready for the assistant's answer: through the
    tokenizer's chat template when it has one, else the contents joined and a blank line (base models)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise KVShrinkError("messages must be a non-empty list of {role, content} objects with text content")
    if getattr(tokenizer, "chat_template", None):
        if not all(m.get("role") in ("system", "user", "assistant") for m in messages):
            raise KVShrinkError("every message needs a role: system, user or assistant")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize, return_dict=False)
    text = "\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer(text)["input_ids"] if tokenize else text


def pad_token_id(tokenizer) -> int:
    """The pad id, else end-of-sequence, else 0: padding is masked out, so any id serves."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def read_text_file(path: Path, flag: str = "--text") -> str:
    """A prompt file's text, read before any model is loaded; one-line errors for a missing, empty or non-UTF-8 one."""
    if not path.is_file():
        raise KVShrinkError(f"{flag} {path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KVShrinkError(f"{flag} {path}: cannot read it as text ({type(exc).__name__}); give a UTF-8 text file") from exc
    if not content.strip():
        raise KVShrinkError(f"{flag} {path} is empty")
    return content
