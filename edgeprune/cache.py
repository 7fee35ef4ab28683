"""Where edgeprune keeps what it builds once and reuses (pretrained MoE, originals, baselines, stages).

``$EDGEPRUNE_CACHE`` or ``~/.cache/edgeprune``. Every entry is written into a temporary sibling directory
and swapped into place when complete, so an interrupted run never leaves a half-written entry.

The swap has no window: on Linux the new directory and the previous one trade places in one
``renameat2(RENAME_EXCHANGE)`` call, so at every instant the path holds either the old or the new entry.
Where that call is missing, two renames are used and a previous entry stranded between them by a kill is put
back by the next :func:`atomic_dir` on the same path. Temporary directories left by killed processes are
removed on the next write beside them.

Cached stages are verified, not trusted: :func:`seal` records the SHA-256 of every file a stage wrote and
:func:`verify` checks them before the stage is reused. :class:`Entry` (any cached directory: an original, a
converted checkpoint) and :class:`Stage` (a build stage named by the fingerprint of its inputs) are the one way
every cached thing is reused or written: fingerprint -> verified reuse -> atomic write -> seal.
"""
from __future__ import annotations

import contextlib
import errno
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional


def cache_root() -> Path:
    """``$EDGEPRUNE_CACHE`` or ``~/.cache/edgeprune``, checked once per location: a folder edgeprune can write,
    or one line (exit 2) that says why not."""
    root = Path(os.environ.get("EDGEPRUNE_CACHE", Path.home() / ".cache" / "edgeprune"))
    if str(root) not in _USABLE:
        _check_cache(root)
        _USABLE.add(str(root))
    return root


_USABLE: set[str] = set()


def _check_cache(root: Path) -> None:
    from edgeprune.errors import ConfigError

    where = "EDGEPRUNE_CACHE" if "EDGEPRUNE_CACHE" in os.environ else "the cache"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{where} {root} is a file, not a folder; point EDGEPRUNE_CACHE at a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=root))
    except OSError as exc:
        raise ConfigError(f"{where} {root} cannot be used ({exc.strerror or exc}); point EDGEPRUNE_CACHE at a "
                          "writable folder") from None


def fingerprint(*parts) -> str:
    """Short stable hash of JSON-able parts (configs, file hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


SEAL = "edgeprune_files.json"
UNHASHED = {"edgeprune_original.json", SEAL}


def dir_sha256(path: str | Path) -> str:
    """Hash of every file of a checkpoint directory (weights in any format, configs, tokenizer), recursively,
    except edgeprune's own bookkeeping: what identifies a model."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.name in UNHASHED or rel.startswith("."):
            continue
        h.update(rel.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def seal(directory: str | Path) -> None:
    """Record the SHA-256 of every file in ``directory`` (``edgeprune_files.json``) for :func:`verify`."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): file_sha256(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != SEAL}
    (directory / SEAL).write_text(json.dumps(files, indent=1))


def verify(directory: str | Path) -> Optional[str]:
    """None when ``directory`` holds exactly the files :func:`seal` recorded, unchanged; else what is wrong."""
    directory = Path(directory)
    try:
        files = json.loads((directory / SEAL).read_text())
    except (OSError, ValueError):
        return f"no valid {SEAL}"
    for rel, digest in files.items():
        p = directory / rel
        if not p.is_file():
            return f"{rel} is missing"
        if file_sha256(p) != digest:
            return f"{rel} was modified"
    extra = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.name != SEAL and p.relative_to(directory).as_posix() not in files)
    return f"{extra[0]} was added" if extra else None


def reusable(directory: str | Path, log=print) -> bool:
    """True when a cached stage exists and verifies; a damaged one is removed (and said so) to be rebuilt."""
    directory = Path(directory)
    if not directory.exists():
        return False
    problem = verify(directory)
    if problem is None:
        return True
    log(f"cache: {directory.name} is damaged ({problem}); rebuilding it")
    shutil.rmtree(directory, ignore_errors=True)
    return False


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the call is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stranded(final: str | Path) -> list[str]:
    """Before writing ``final``: put back a previous entry stranded by a kill between two renames, and remove
    temporary directories of dead processes. Returns what was done (for the log)."""
    final = Path(final)
    done = []
    if not final.parent.is_dir():
        return done
    for p in sorted(final.parent.glob(f".{final.name}.*-*")):
        kind, _, rest = p.name[len(final.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not final.exists():
            os.replace(p, final)
            done.append(f"restored the previous {final.name} from {p.name}")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by a killed run")
    return done


def swap_into_place(tmp: Path, final: Path) -> None:
    """Make ``tmp`` be ``final``; the previous ``final`` (if any) is removed. No instant without either."""
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous entry
        return
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_stranded(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        swap_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def log(msg: str) -> None:
    print(f"[edgeprune] {msg}", flush=True)


class Entry:
    """A cached directory: reused only when every file it holds verifies against its seal (and the caller's
    ``check`` passes), else written into a temporary sibling that is sealed and swapped into place, so an
    interrupted write leaves nothing behind. The log says which entry was reused (with a ``label``), or which was
    rebuilt and why."""

    def __init__(self, directory: str | Path, label: Optional[str] = None):
        self.dir = Path(directory)
        self.label = label

    def reuse(self, check: Optional[Callable[[Path], Optional[str]]] = None, verified: str = "files verified") -> bool:
        """True when the entry verifies (and ``check`` returns None, else what is wrong: said, and the entry
        removed to be rebuilt)."""
        if not reusable(self.dir, log):
            return False
        problem = check(self.dir) if check is not None else None
        if problem is None:
            if self.label:
                log(f"{self.label}: reusing {self.dir} ({verified})")
            return True
        log(f"cache: {self.dir.name} {problem}; rebuilding it")
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    @contextlib.contextmanager
    def write(self) -> Iterator[Path]:
        """A temporary directory that becomes the entry, sealed, only if the block completes."""
        with atomic_dir(self.dir) as tmp:
            yield tmp
            seal(tmp)

    def run(self, build: Callable[[Path], None], check: Optional[Callable[[Path], Optional[str]]] = None,
            verified: str = "files verified") -> Path:
        """The entry's directory: reused when it verifies, else built by ``build(tmp)`` and sealed."""
        if not self.reuse(check, verified):
            with self.write() as tmp:
                build(tmp)
        return self.dir


class Stage(Entry):
    """``Stage(name, *inputs)``: the cached directory of a build stage whose output depends only on ``inputs``
    (configs and file hashes, anything JSON-able), under ``stages/`` of the cache."""

    def __init__(self, name: str, *inputs, label: Optional[str] = None):
        super().__init__(cache_root() / "stages" / f"{name}-{fingerprint(name, *inputs)}", label or name)
