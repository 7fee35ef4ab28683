"""Guards run before any heavy work: edgeprune never writes into, over or around what it was given.

* :func:`refuse_overlap`: an output path that is, contains or lies inside an input (checkpoint, dense
  checkpoint, plan, data files, the cache) is refused with one line (exit 2). ``edgeprune build --model D
  --out D`` used to replace the user's checkpoint by the artifact.
* :func:`check_writable`: the output's nearest existing ancestor must be a writable directory, checked
  before the pipeline runs rather than after it.
* :func:`resolve_output`: an output folder is replaced whole, so an existing one must be edgeprune's own (it
  holds one of :data:`MARKERS`) or empty; a user's folder, a dangling link or the current directory is refused
  before any work (exit 2). Links are resolved up front, so the new folder is written where the link points and
  nothing is left beside the link.
* :func:`output_lock`: one writer per output path (``fcntl.flock`` on a sibling lock file); a second build
  into the same ``--out`` fails at once with one line instead of silently racing the first.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

from edgeprune.errors import ConfigError


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_overlap(out: str | os.PathLike, inputs: Mapping[str, Optional[str | os.PathLike]], option: str = "--out") -> None:
    """One-line :class:`ConfigError` when ``out`` is, contains or lies inside one of ``inputs``."""
    o = _resolved(out)
    for name, path in inputs.items():
        if path is None:
            continue
        p = _resolved(path)
        if o == p:
            raise ConfigError(f"{option} {out} is the {name} itself; it would be overwritten. Choose another {option}")
        if _inside(p, o):
            raise ConfigError(f"{option} {out} contains the {name} ({path}); it would be deleted. "
                              f"Choose an {option} outside it")
        if _inside(o, p) and not p.is_file():
            raise ConfigError(f"{option} {out} lies inside the {name} ({path}); edgeprune never writes into its "
                              f"inputs. Choose an {option} outside it")


MARKERS = ("edgeprune.json", "edgeprune_prune.json", "edgeprune_original.json", "edgeprune_upcycle.json")
"""Files that only edgeprune writes at the top of its outputs: an artifact (``edgeprune.json``), a pruned
checkpoint, an original, an upcycled checkpoint. A folder holding one of them may be replaced."""


def resolve_output(out: str | os.PathLike, option: str = "--out") -> Path:
    """The real path an output folder ``out`` will be written to, refused (one line, exit 2) when replacing it
    could lose a user's files: an existing folder that is neither empty nor an edgeprune output, a symbolic link
    that points nowhere, or the current directory (or a folder around it)."""
    given = Path(os.path.expanduser(str(out)))
    if given.is_symlink() and not given.exists():
        raise ConfigError(f"{option} {out} is a symbolic link to {os.readlink(given)}, which does not exist; "
                          f"remove the link or choose another {option}")
    real = _resolved(given)
    if _inside(_resolved(os.getcwd()), real):
        raise ConfigError(f"{option} {out} is the current directory or contains it, and edgeprune replaces its "
                          f"{option} whole; choose a new folder, e.g. {option} build/out")
    if real.is_dir():
        try:
            entries = sorted(e.name for e in real.iterdir())
        except OSError as exc:
            raise ConfigError(f"{option} {out}: cannot read the folder ({exc.strerror}); choose another "
                              f"{option}") from None
        if entries and not any((real / m).is_file() for m in MARKERS):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(f"{option} {out} is an existing folder that edgeprune did not write ({len(entries)} "
                              f"entries: {shown}); edgeprune replaces its {option} whole, so give a new or empty "
                              "folder")
    return real


def check_writable(out: str | os.PathLike, option: str = "--out", directory: bool = True) -> None:
    """``out`` (a directory, or a file when not ``directory``) can be created: its nearest existing ancestor is
    a writable directory, and it is not an existing path of the other kind (else one line, exit 2)."""
    o = _resolved(out)
    if directory and o.exists() and not o.is_dir():
        raise ConfigError(f"{option} {out} exists and is a file, not a directory; remove it or choose another {option}")
    if not directory and o.is_dir():
        raise ConfigError(f"{option} {out} is a directory; give a file path, e.g. {out}/prune_plan.json")
    anc = o.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{option} {out}: {anc} is a file, so the directory cannot be created; choose another {option}")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {out}: {anc} is not writable; choose a writable location")
    try:  # root passes os.access everywhere (and /proc, read-only mounts, full disks lie to it): really try
        os.rmdir(tempfile.mkdtemp(prefix=".edgeprune-probe-", dir=anc))
    except OSError as exc:
        raise ConfigError(f"{option} {out}: cannot create anything in {anc} ({exc.strerror}); choose a writable "
                          "location") from None


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``out`` for the block (released on exit, even on a kill: the
    kernel drops ``flock`` locks with the process)."""
    import fcntl

    o = _resolved(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    lock_path = o.parent / f".{o.name}.lock"
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(f"another edgeprune process is writing {out} (lock {lock_path}); wait for it "
                                  "or choose another --out") from None
            raise
        yield
    finally:
        fh.close()


def writer_lock(out: str | os.PathLike):
    """:func:`output_lock` in the process that writes (under ``torchrun``, rank 0; the other ranks only share the
    calibration, :mod:`edgeprune.scale.distributed`), nothing in the others."""
    from edgeprune.scale import distributed

    return output_lock(out) if distributed.is_writer() else contextlib.nullcontext()
