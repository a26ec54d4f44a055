"""How one-line error messages quote the exception that caused them."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
  """`Type: first line of its message`: a library's error (tokenizer, safetensors, JSON) is often several lines."""
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
