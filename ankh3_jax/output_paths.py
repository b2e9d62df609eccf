"""Where a command may write, and how: the one rule every writing command follows.

A command never deletes or replaces anything it did not create unless the user passes
`--overwrite`, and never its input, a directory holding its input, or the working
directory, even then. `check_output_dir` / `check_output_file` apply the rule before any
work starts; `atomic_directory` / `atomic_file` then write to a temporary sibling that
replaces the target only once complete; `OutputLock` keeps two writers off one file.
Everything here is plain Python (no JAX), so commands can check their outputs first.
"""
import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import uuid
from typing import Callable, Iterable, Iterator, Optional


class OutputError(ValueError):
  """An output path the command must not write; the message says why and what to do."""


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, directory: str) -> bool:
  """Whether real path `path` is `directory` or lies under it."""
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_not_input(path: str, inputs: Iterable[Optional[str]] = (),
                    what: str = "output") -> None:
  """Refuses an output that is an input, holds an input, or holds the working directory."""
  out = _real(path)
  if _inside(_real(os.getcwd()), out):
    raise OutputError(f"{what} {path} is (or contains) the working directory "
                      f"{os.getcwd()}: choose another path")
  for source in inputs:
    if source is None:
      continue
    if _real(source) == out:
      raise OutputError(f"{what} {path} is the input {source}: choose another path")
    if _inside(_real(source), out):
      raise OutputError(f"{what} {path} contains the input {source}: choose another path")


def check_output_dir(path: str, inputs: Iterable[Optional[str]] = (), *,
                     overwrite: bool = False,
                     is_ours: Optional[Callable[[str], bool]] = None,
                     what: str = "output directory") -> None:
  """Checks a directory a command will create or replace as a whole.

  Allowed: a new path, an empty directory, one `is_ours` recognises (written earlier by
  the same command), or anything else with `overwrite`; never an input or the working
  directory (`check_not_input`).
  """
  check_not_input(path, inputs, what)
  if not os.path.lexists(path):
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
      raise OutputError(f"{what} {path}: {parent} is a file, not a directory")
    return
  if not os.path.isdir(path):
    if overwrite:
      return
    raise OutputError(f"{what} {path} exists and is not a directory; choose another path "
                      "or pass --overwrite to replace it")
  entries = sorted(os.listdir(path))
  if not entries or (is_ours is not None and is_ours(path)) or overwrite:
    return
  shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
  raise OutputError(f"{what} {path} already exists and holds files this command did not "
                    f"write ({shown}); choose a new path, or pass --overwrite to replace it")


def check_writable_dir(directory: str, what: str) -> None:
  """Checks `directory` exists and a file can be created in it (a real test: root ignores
  permission bits, read-only mounts do not)."""
  if not os.path.isdir(directory):
    raise OutputError(f"{what}: directory {directory} does not exist")
  try:
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
  except OSError as e:
    raise OutputError(f"{what}: cannot write in {directory} ({e.strerror})") from e
  os.close(fd)
  os.unlink(probe)


def check_output_file(path: str, inputs: Iterable[Optional[str]] = (), *,
                      overwrite: bool = False, what: str = "output") -> None:
  """Checks a file a command will write at the end of its work, before the work starts:
  its directory exists and is writable, it is no input, and an existing file is replaced
  only with `overwrite`."""
  check_not_input(path, inputs, what)
  if os.path.isdir(path):
    raise OutputError(f"{what} {path} is a directory; name a file")
  check_writable_dir(os.path.dirname(os.path.abspath(path)), f"{what} {path}")
  if os.path.lexists(path) and not overwrite:
    raise OutputError(f"{what} {path} already exists; choose a new path or pass "
                      "--overwrite to replace it")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", **open_kwargs) -> Iterator:
  """Opens a temporary sibling of `path` for writing; on success it replaces `path`.

  On an exception the temporary file is removed and `path` is left untouched.
  """
  path = os.path.abspath(os.fspath(path))
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                             prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_directory(directory: str) -> Iterator[str]:
  """Yields a temporary sibling of `directory`; on success it replaces `directory`.

  On an exception the temporary folder is removed and `directory` is left untouched.
  Callers check the target first (`check_output_dir`): this replaces what is there.
  """
  directory = os.path.abspath(directory)
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = os.path.join(parent, f".{name}.partial-{tag}")
  old = os.path.join(parent, f".{name}.old-{tag}")
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.lexists(directory):
    os.rename(directory, old)
    try:
      os.rename(tmp, directory)
    except BaseException:
      os.rename(old, directory)
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    if os.path.isdir(old) and not os.path.islink(old):
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.unlink(old)
  else:
    os.rename(tmp, directory)


def lock_path(path: str) -> str:
  directory, name = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f".{name}.lock")


class OutputLock:
  """An exclusive `flock` on `.<name>.lock` next to an output, held while writing it.

  A second writer gets `OutputError` naming the holder's pid at once, instead of
  reading a file that is being written. The lock file is removed on release.
  """

  def __init__(self, path: str, command: str):
    self.path = path
    self.command = command
    self.lock_file = lock_path(path)
    self._fd = None

  def __enter__(self) -> "OutputLock":
    while True:
      fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        who = " ".join(holder[1:2] + [f"pid {holder[0]}"] if holder else ["another process"])
        raise OutputError(f"{self.path} is in use: {who} is writing it; wait for it to "
                          "finish, or choose another output") from None
      # The holder may have removed the lock file between our open and flock: retry then.
      try:
        same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {self.command}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.lock_file)
      os.close(self._fd)
      self._fd = None
