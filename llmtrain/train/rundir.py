"""The run directory: one job writes it at a time, and every write to it fails in one line.

- `RunDirLock`: an exclusive OS lock (`flock`) on `<run_dir>/.lock`, taken by rank 0 for the
  job's lifetime. The kernel drops it when the process dies, so a crashed job leaves no stale
  lock behind; the file records the holder's pid, host and start time for the message a second
  job gets. Two jobs on one directory would log every step twice and publish damaged
  checkpoints.
- `RunDir.writing(name)` / `RunDir.write_text(name, text)`: a write that fails (a full disk, a read-only mount)
  becomes a `RunError` naming the file, the cause and the last good checkpoint, so a run stops
  with one line and resumes from that checkpoint once the disk has room. `write_text` replaces
  the file atomically, so a failed write never leaves half a summary or config behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from llmtrain.config import ConfigError

LOCK_FILE = ".lock"


class RunError(RuntimeError):
    """A run that cannot go on (printed as one line; exit code 1): nothing is lost that the last
    good checkpoint holds."""


class RunDirLock:
    """`with RunDirLock(run_dir):` holds the directory's lock; a second holder is refused with a
    ConfigError naming the first."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunDirLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"logging.run_dir={str(self.path.parent)!r} cannot be written "
                              f"({e.strerror or e}); choose a writable run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(f"logging.run_dir={str(self.path.parent)!r} is in use by another "
                              f"llmtrain job ({holder}); wait for it to end or choose another "
                              f"run_dir") from None
        except OSError as e:  # a filesystem without flock (some NFS / Lustre mounts)
            print(f"warning: cannot lock {self.path} ({e.strerror or e}); a second job on this "
                  f"run dir would not be refused", file=sys.stderr)
        self.fd = fd
        try:  # who holds it, for the message a second job gets
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except OSError:
            pass  # a full disk: the lock holds all the same
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(info['pid'])} on {str(info['host'])[:64]} since {str(info['since'])[:32]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


class RunDir:
    """Writes into a run directory. `last_good()` names the checkpoint a rerun resumes from, for
    the message of a failed write."""

    def __init__(self, path: Path, last_good=lambda: "none"):
        self.path = Path(path)
        self.last_good = last_good

    @contextlib.contextmanager
    def writing(self, name: str):
        """Turn a failed write of `<run_dir>/<name>` into a one-line RunError."""
        try:
            yield self.path / name
        except OSError as e:
            raise RunError(f"cannot write {self.path / name} ({e.strerror or e}); the run "
                           f"stopped here and resumes from the last good checkpoint "
                           f"({self.last_good()}) once it can write again") from None

    def write_text(self, name: str, text: str) -> None:
        """Replace `<run_dir>/<name>` with `text` atomically (a temporary file renamed over it),
        so a failed write leaves the previous version whole."""
        with self.writing(name) as path:
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
