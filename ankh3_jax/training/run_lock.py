"""One `ankh3-train` per MODEL_DIR: an exclusive lock on MODEL_DIR/ankh3_train.lock.

Two runs on one directory would each delete the other's checkpoints in progress (orbax
keeps N and cleans up temporary directories). Process 0 of a run holds `fcntl.flock`
on the lock file for the whole run and writes its host, pid and start time into it, so
a second run is refused naming the holder. The kernel drops a flock when its process
dies, so a lock left by a killed run is simply taken over (said in the log). Paths with
a scheme (gs://, s3://) cannot be flock'ed: no lock is taken and a warning says so
(`train` refuses them anyway: mount the bucket); likewise on a local file system without
flock support.
"""
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Optional

LOCK_FILE = "ankh3_train.lock"


class RunLockHeld(RuntimeError):
  """Another live run holds MODEL_DIR's lock; the message names its host and pid."""


def is_local_path(path: str) -> bool:
  return "://" not in path


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
          f"started {holder.get('started', '?')}")


class RunLock:
  """`with RunLock(model_dir):` holds the lock (or raises RunLockHeld)."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._fd: Optional[int] = None

  def acquire(self) -> bool:
    """Takes the lock; False when no lock can be taken here (remote or no flock)."""
    if not is_local_path(self.model_dir):
      logging.warning("MODEL_DIR %s is not a local path: no lock is taken; make sure no "
                      "other ankh3-train uses it at the same time", self.model_dir)
      return False
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise RunLockHeld(
            f"{self.model_dir} is in use by another ankh3-train ({_describe(holder)}; "
            f"lock file {self.path}): wait for it to finish or stop it, or use another "
            "MODEL_DIR") from None
      logging.warning("cannot lock %s (%s): this file system has no flock; make sure no "
                      "other ankh3-train uses MODEL_DIR at the same time", self.path, e)
      return False
    previous = _read(fd)
    if previous.get("pid") is not None and not previous.get("released"):
      same_host = previous.get("host") == socket.gethostname()
      state = ("no longer running" if same_host and not _pid_alive(int(previous["pid"]))
               else "no longer holding it")
      logging.warning("taking over the lock of %s left by %s (%s)", self.model_dir,
                      _describe(previous), state)
    _write(fd, {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    self._fd = fd
    return True

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      _write(self._fd, {**_read(self._fd), "released": True})
    except OSError as e:  # e.g. a full disk: the kernel still drops the lock below
      logging.warning("could not mark %s released: %s", self.path, e)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def holder(model_dir: str) -> dict:
  """The lock file's record ({} if none): host, pid, started, released."""
  try:
    fd = os.open(os.path.join(model_dir, LOCK_FILE), os.O_RDONLY)
  except FileNotFoundError:
    return {}
  try:
    return _read(fd)
  finally:
    os.close(fd)


def _read(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", "replace")
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def _write(fd: int, record: dict) -> None:
  """Rewrites the lock file's record (only while holding the lock)."""
  data = json.dumps(record).encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)
