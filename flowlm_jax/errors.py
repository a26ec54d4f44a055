"""How one-line error messages quote the exception that caused them."""

from __future__ import annotations


def first_line(e: BaseException, max_chars: int | None = None) -> str:
  """`Type: first line of its message` (`Type` alone when it has none): a library's error (tokenizer,
  safetensors, JSON, Orbax) is often several lines; `max_chars` cuts a long first line."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0].rstrip()[:max_chars]}" if lines else type(e).__name__
