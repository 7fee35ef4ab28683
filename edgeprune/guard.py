"""Guards run before any heavy work: edgeprune never writes into, over or around what it was given.

* :func:`refuse_overlap`: an output path that is, contains or lies inside an input (checkpoint, dense
  checkpoint, plan, data files, the cache) is refused with one line (exit 2). ``edgeprune build --model D
  --out D`` used to replace the user's checkpoint by the artifact.
* :func:`check_writable`: the output's nearest existing ancestor must be a writable directory, checked
  before the pipeline runs rather than after it.
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
