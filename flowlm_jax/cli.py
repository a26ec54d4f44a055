"""What every command-line entry point shares: list-valued config flags and quiet library output.

Light on purpose (absl and ml_collections only): entry points call these before the heavy imports.
"""

from __future__ import annotations

import ast
import logging
import os

from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser


class StringTupleParser(tuple_parser.TupleParser):  # a TupleParser, so that config_flags accepts repeated flags
  """Parses a `--config.x=...` override of a tuple field (the schema's list-valued fields).

  `("a", "b")` or `["a", "b"]` is read as a Python literal; anything else is ONE element, spaces and
  commas included, so that repeated flags `--config.x="add 1 2" --config.x="To be, or not"` give
  ("add 1 2", "To be, or not"). (ml_collections' own tuple parser rejects elements with spaces.)
  """

  def parse(self, argument):
    if isinstance(argument, (tuple, list)):
      return tuple(argument)
    try:
      value = ast.literal_eval(argument)
    except (ValueError, SyntaxError):
      value = None
    return tuple(value) if isinstance(value, (tuple, list)) else (argument,)


def register_config_parsers() -> None:
  """Makes ml_collections' `--config.*` overrides parse tuple fields with `StringTupleParser`."""
  config_flags.register_flag_parser_for_type(tuple, StringTupleParser())


# Library loggers that report progress, not problems: their warnings and errors only.
CHATTY_LOGGERS = ("absl", "jax", "orbax", "datasets", "httpx", "urllib3")


def quiet_libraries() -> None:
  """Call before transformers is imported: only messages a user should act on.

  transformers 5 prints "PyTorch was not found..." at import, an advisory warning that is irrelevant
  here (only its tokenizers are used); TRANSFORMERS_NO_ADVISORY_WARNINGS silences exactly that kind.
  Environment variables are defaults only: a user's own setting wins.
  """
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
  for name in CHATTY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
