"""The one shape of the `ankh3-*` commands.

Each command is a `main(argv=None) -> int` at the end of the module whose library it
wraps (setup.py points its console script there; `python -m <module>` runs the same):
it parses the flags, calls the module's library functions and reports an expected
failure (bad flag, bad input file, unwritable output) as one `<prog>: error: ...` line
with the command's exit code instead of a traceback. Commands that take gin bindings
split them from the flags with `gin_files.split_gin_flags`.
"""
import sys


def error(prog: str, message, code: int = 2) -> int:
  """Prints `prog: error: message` to stderr; returns `code` (the exit code)."""
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  return code


def one_line(error_or_text) -> str:
  """The text of an error (its type name if empty) with its whitespace runs as one space."""
  text = str(error_or_text) or type(error_or_text).__name__
  return " ".join(text.split())
