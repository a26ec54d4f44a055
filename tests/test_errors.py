"""errors.first_line: how every one-line error quotes its cause (tokenizer, safetensors, JSON, Orbax, wandb)."""

import pytest

from flowlm_jax.errors import first_line


@pytest.mark.parametrize("error, max_chars, quoted", [
    (ValueError("bad header\n  at byte 8\n"), None, "ValueError: bad header"),
    (OSError("\n\n  disk full  \nmore"), None, "OSError: disk full"),
    (KeyError(), None, "KeyError"),
    (RuntimeError("   \n"), None, "RuntimeError"),
    (RuntimeError("x" * 500), 200, "RuntimeError: " + "x" * 200),
], ids=["several-lines", "leading-blank-lines", "no-message", "blank-message", "cut"])
def test_first_line_quotes_the_type_and_the_first_line_of_the_message(error, max_chars, quoted):
  assert first_line(error, max_chars) == quoted
