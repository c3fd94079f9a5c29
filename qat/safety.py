"""What keeps a user's files safe: export markers, replace checks, hidden temp folders, run locks, modes.

- Every export qat writes carries ``.qat-export`` (JSON: the names it wrote). ``--overwrite`` replaces
  a folder only when that marker is there and nothing else is: never the input, never a user's file.
- Temporary folders beside a target are named ``.<target>.tmp-<pid>-<random>`` (and the swapped-out
  old export ``.<target>.old-<pid>-<random>``), so a later run can tell a dead process's leftovers
  from a live one's and clean (or restore) them.
- :class:`OutputLock` holds ``<output_dir>/.qat-lock`` (an ``flock``, released by the kernel even on
  ``kill -9``) for the life of a run; a lock file left by a dead process is taken over, with a message.
- Files and folders qat creates get the user's umask (``mkdtemp`` alone makes folders 0700 and
  safetensors writes files 0600).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

EXPORT_MARKER = ".qat-export"
LOCK_FILE = ".qat-lock"
_HIDDEN = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


# ------------------------------------------------------------------------------------------ modes
def umask() -> int:
    """The process umask (read by setting and restoring it: there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything under it the modes a plain ``mkdir`` / ``open`` would have."""
    mask = umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dir_mode)
        for f in files:
            os.chmod(os.path.join(root, f), file_mode)


# ------------------------------------------------------------------------------------------ exports
def hidden_temp(target: Path, kind: str = "tmp") -> Path:
    """A new empty hidden folder beside ``target``, named so :func:`clean_leftovers` can judge it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))


def hidden_name(target: Path, kind: str, tag: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{tag}")


def write_marker(folder: Path, command: str) -> None:
    """Record that qat wrote ``folder`` and which names are its own (written last, before the swap)."""
    names = sorted(p.name for p in folder.iterdir())
    (folder / EXPORT_MARKER).write_text(json.dumps({"written_by": "qat", "command": command, "files": names}))


def _marker_files(folder: Path) -> list[str] | None:
    try:
        meta = json.loads((folder / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta.get("files") if isinstance(meta, dict) and meta.get("written_by") == "qat" else None


def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or outer in inner.parents


def _legacy_files(folder: Path, is_export_file) -> list[str] | None:
    """An export written before the marker existed: config.json with a quantization_config, qat's
    qat_config.json, and only names an export writes (``is_export_file``)."""
    if is_export_file is None or not (folder / "qat_config.json").is_file():
        return None
    try:
        if "quantization_config" not in json.loads((folder / "config.json").read_text()):
            return None
    except (OSError, ValueError):
        return None
    names = [p.name for p in folder.iterdir()]
    return names if all(is_export_file(n) for n in names) else None


def check_replaceable(out_dir: Path, inputs: tuple = (), is_export_file=None) -> None:
    """Raise FileExistsError unless replacing ``out_dir`` loses nothing: it must be an earlier qat
    export (``.qat-export`` marker, or a pre-marker export recognised by ``is_export_file``) holding
    only the files that export wrote, and hold none of ``inputs``."""
    for given in inputs:
        if given is not None and Path(given).exists() and _contains(out_dir, Path(given)):
            raise FileExistsError(f"{out_dir} holds the input {given}: --overwrite would delete it; "
                                  "choose another output folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    own = _marker_files(out_dir)
    if own is None:
        own = _legacy_files(out_dir, is_export_file)
    if own is None:
        raise FileExistsError(f"{out_dir} is not a qat export (no {EXPORT_MARKER} marker): --overwrite replaces "
                              "only an earlier export; move your files or choose another output folder")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in own and p.name != EXPORT_MARKER)
    if foreign:
        raise FileExistsError(f"{out_dir} holds files qat did not write ({', '.join(foreign[:5])}): "
                              "--overwrite would delete them; move them or choose another output folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_leftovers(target: Path) -> list[str]:
    """Remove the hidden temp folders a killed export of ``target`` left beside it; restore the old
    export when a swap was cut between its two renames. Returns what it did, one line each."""
    done = []
    if not target.parent.is_dir():
        return done
    for path in sorted(target.parent.iterdir()):
        m = _HIDDEN.match(path.name)
        if not m or m["target"] != target.name or _pid_alive(int(m["pid"])) and int(m["pid"]) != os.getpid():
            continue
        if m["kind"] == "old" and not target.exists():
            path.rename(target)  # killed between "old aside" and "new in place": the old one is the export
            done.append(f"restored {target} from {path.name} (an interrupted export had moved it aside)")
            continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}, left by an interrupted export")
    for line in done:
        print(f"qat: {line}", file=sys.stderr)
    return done


@contextlib.contextmanager
def signals_raise():
    """SIGTERM raises SystemExit inside the block (SIGINT already raises KeyboardInterrupt), so the
    ``except`` / ``finally`` clauses that remove temporary folders run when a job is stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------ run lock
class OutputLock:
    """``flock`` on ``<folder>/.qat-lock`` for the life of a run; the file names the holder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @staticmethod
    def holder(folder: str | Path) -> dict | None:
        """The live run holding ``folder`` (its lock record), or None when it is free."""
        path = Path(folder) / LOCK_FILE
        if not path.exists():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return _read_record(path) or {"pid": "?"}
        finally:
            os.close(fd)  # closing drops the probe's shared lock
        return None

    def acquire(self) -> "OutputLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            held = _read_record(self.path) or {}
            raise ValueError(f"output_dir {self.folder} is in use by another qat run (pid {held.get('pid', '?')} "
                             f"on {held.get('host', '?')}, started {held.get('started', '?')}): wait for it to "
                             "finish or choose another --output_dir") from None
        stale = _read_record(self.path)
        if stale and stale.get("pid") != os.getpid():
            print(f"qat: taking over the lock of {self.folder} left by process {stale.get('pid')} "
                  f"(started {stale.get('started', '?')}), which is no longer running", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Emptied, not unlinked: a run that opened the file meanwhile would otherwise lock a deleted
        # inode while a third creates a new one. An empty record reads as "free, nothing stale".
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ------------------------------------------------------------------------------------------ untrusted models
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def check_model_folder(path: str | Path) -> None:
    """A local folder given as a model must hold a config.json and weights (else one clear sentence)."""
    folder = Path(path)
    if not folder.exists():
        return  # a Hub id: transformers resolves it
    if not folder.is_dir():
        raise ValueError(f"model {folder} is a file, not a model folder: pass the folder that holds config.json "
                         "and the weights")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder (it has no config.json): pass the folder that holds "
                         "config.json and the weights (e.g. one written by save_pretrained)")
    if not any(next(folder.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ValueError(f"{folder} has a config.json but no weights (*.safetensors or pytorch_model*.bin): "
                         "copy the whole model folder")


def transformers_model_class(config, where: str | Path):
    """The model class ``config.architectures`` names, if transformers ships it (else AutoModel).

    An untrusted config.json can name anything: only a ``PreTrainedModel`` subclass or an Auto
    class of transformers is returned, never an arbitrary attribute or a model's own code."""
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if cls is None:
        if getattr(config, "auto_map", None):
            raise ValueError(f"{where} needs its own Python code to build ({arch!r} comes from auto_map in "
                             "config.json); qat does not run a model's code: use a model transformers supports")
        return transformers.AutoModel
    if isinstance(cls, type) and issubclass(cls, (transformers.PreTrainedModel, _BaseAutoModelClass)):
        return cls
    raise ValueError(f"{where}: config.json names architecture {arch!r}, which is not a transformers model "
                     "class: fix `architectures` in config.json")
