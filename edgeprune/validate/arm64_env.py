"""An arm64 Debian root in which the aarch64 build of ONNX Runtime runs under qemu user-mode emulation
(``../shared/DESIGN.md`` section 11): the artifact meets arm64's own kernels (NEON, dot product) on an x86 host.

One command sets it up and caches it (``edgeprune emulate setup``, 3 minutes here and 1 GB, the first time;
``$EDGEPRUNE_ARM64_ROOT`` puts it elsewhere):
qemu-user-static and debootstrap from apt, qemu's binfmt_misc entry enabled, a minimal Debian root
(``debootstrap --arch=arm64 --variant=minbase``, python3 of the host's minor version), and in it a venv with the
aarch64 wheels of the host's onnxruntime, numpy and tokenizers versions (``pip download --platform
manylinux*_aarch64``). The root is written beside its final place and renamed when complete, so an interrupted
set-up leaves nothing half-made. Where the machine cannot emulate (not root, no binfmt_misc, no qemu and no apt),
one line says why (:class:`EmulationError`, exit 6).

The emulated CPU is named by ``QEMU_CPU``, with an arm-format ``/proc/cpuinfo`` that claims what that CPU has
(without one ``import onnxruntime`` reads the host's x86 cpuinfo and dies; with one that claims more than the
CPU, int8 kernels die with SIGILL). qemu's default ``max`` CPU is never used: it claims SME, ONNX Runtime then
takes KleidiAI's SME kernels, whose int8 results are wrong under emulation (DESIGN.md section 11).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgeprune.cache import cache_root
from edgeprune.errors import EmulationError

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"  # python3.11, the minor version of the wheels below
PACKAGES = ("onnxruntime", "numpy", "tokenizers")
READY = "edgeprune-arm64.json"


@dataclass(frozen=True)
class Cpu:
    """An emulated core: qemu's name, the MIDR fields and feature flags its cpuinfo claims, and which int8
    kernels of ONNX Runtime's MLAS that gives (MLAS picks them from the hwcaps: ``asimddp`` -> SDOT/UDOT)."""

    name: str
    part: str
    variant: str
    revision: int
    features: str
    kernels: str

    def cpuinfo(self, cores: int = 2) -> str:
        block = (f"BogoMIPS\t: 50.00\nFeatures\t: {self.features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                 f"CPU variant\t: {self.variant}\nCPU part\t: {self.part}\nCPU revision\t: {self.revision}\n\n")
        return "".join(f"processor\t: {i}\n" + block for i in range(cores))


CPUS = {
    "neoverse-n1": Cpu("neoverse-n1", "0xd0c", "0x3", 1,
                       "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                       "asimddp ssbs", "NEON with the dot-product int8 kernels (SDOT/UDOT; Graviton2 / Ampere class)"),
    "cortex-a72": Cpu("cortex-a72", "0xd08", "0x0", 3, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid",
                      "plain NEON int8 kernels, no dot product (Raspberry Pi 4 class)"),
}


def root_dir() -> Path:
    """``$EDGEPRUNE_ARM64_ROOT`` or ``<cache>/arm64/root`` (the root outlives a per-project cache)."""
    return Path(os.environ["EDGEPRUNE_ARM64_ROOT"]) if os.environ.get("EDGEPRUNE_ARM64_ROOT") else \
        cache_root() / "arm64" / "root"


def ready(root: Path | None = None) -> dict | None:
    """The set-up's record (versions) if the root is complete, else None."""
    path = (root or root_dir()) / READY
    return json.loads(path.read_text()) if path.is_file() else None


def require(root: Path | None = None) -> Path:
    root = root or root_dir()
    if ready(root) is None:
        raise EmulationError(f"no arm64 environment at {root}; set it up once with `edgeprune emulate setup` "
                             "(a few minutes, 1 GB)")
    check_machine(install=False)
    return root


def check_machine(install: bool) -> None:
    """Root, qemu-aarch64-static (apt-installed when ``install`` and apt exists) and qemu's binfmt_misc entry."""
    if sys.platform != "linux":
        raise EmulationError(f"arm64 emulation needs Linux (qemu user mode and binfmt_misc); this is {sys.platform}")
    if os.geteuid() != 0:
        raise EmulationError("arm64 emulation needs root (debootstrap, chroot, binfmt_misc); run as root or in a "
                             "container started with --privileged")
    tools = ("qemu-aarch64-static", "debootstrap", "update-binfmts")
    if install and any(shutil.which(t) is None for t in tools):
        if shutil.which("apt-get") is None:
            raise EmulationError("qemu-aarch64-static, debootstrap or update-binfmts is missing and there is no "
                                 "apt-get; install qemu-user-static, binfmt-support and debootstrap")
        _run(["apt-get", "install", "-y", "-q", "qemu-user-static", "binfmt-support", "debootstrap"],
             "apt-get install qemu-user-static binfmt-support debootstrap", env={"DEBIAN_FRONTEND": "noninteractive"})
    if shutil.which("qemu-aarch64-static") is None:
        raise EmulationError("qemu-aarch64-static is missing; run `edgeprune emulate setup` (apt-get install "
                             "qemu-user-static binfmt-support debootstrap)")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        done = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise EmulationError("no binfmt_misc: the kernel cannot hand arm64 binaries to qemu here (mount -t "
                                 f"binfmt_misc failed: {done.stderr.strip()[:80]}); use a host or container that "
                                 "allows it (--privileged)")
    if not (binfmt / "qemu-aarch64").exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not (binfmt / "qemu-aarch64").exists():
        raise EmulationError("binfmt_misc has no qemu-aarch64 entry (update-binfmts --enable qemu-aarch64 did not "
                             "add it); reinstall qemu-user-static and binfmt-support")


def _run(cmd: list[str], what: str, env: dict | None = None, log: Path | None = None) -> None:
    """Run a set-up step; on failure one line with the step and the log's last line."""
    sink = open(log, "a") if log else subprocess.PIPE
    try:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {})})
    finally:
        if log:
            sink.close()
    if done.returncode != 0:
        tail = (log.read_text() if log else done.stdout or "").strip().splitlines()[-1:] or [""]
        raise EmulationError(f"{what} failed (exit {done.returncode}): {tail[0][:120]}" +
                             (f"; full log: {log}" if log else ""))


def setup(echo=print, force: bool = False) -> Path:
    """Build the arm64 root once (cached: returns at once when it is complete and ``force`` is not set)."""
    check_machine(install=True)
    root = root_dir()
    if ready(root) is not None and not force:
        echo(f"arm64 environment ready: {root}")
        return root
    work = root.with_name("root.partial")
    log = root.with_name("setup.log")
    for stale in (work,):
        if stale.exists():
            shutil.rmtree(stale)
    work.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    echo(f"[1/3] debootstrap --arch=arm64 {SUITE} (about 8 minutes; log {log})")
    _run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv,python3-pip",
          SUITE, str(work), MIRROR], "debootstrap", log=log)
    guest = subprocess.run(["chroot", str(work), "python3", "-c", "import sys;print(sys.version_info[:2])"],
                           capture_output=True, text=True).stdout.strip()
    if guest != f"({sys.version_info.major}, {sys.version_info.minor})":
        raise EmulationError(f"the arm64 root has python {guest}, the host {minor}: the wheels must match; run the "
                             f"host on python {minor} or change SUITE in {__file__}")
    versions = {p: metadata.version(p) for p in PACKAGES}
    wheels = work / "opt" / "wheels"
    echo(f"[2/3] aarch64 wheels: {', '.join(f'{p}=={v}' for p, v in versions.items())}")
    _run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(wheels), "--only-binary=:all:",
          "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_28_aarch64", "--python-version", minor,
          "--implementation", "cp", *(f"{p}=={v}" for p, v in versions.items())], "pip download (aarch64)", log=log)
    echo("[3/3] venv inside the arm64 root (emulated pip)")
    _run(["chroot", str(work), "python3", "-m", "venv", "/opt/venv"], "python3 -m venv (arm64)", log=log)
    _run(["chroot", str(work), "/opt/venv/bin/pip", "install", "-q", "--no-index", "--find-links", "/opt/wheels",
          *PACKAGES], "pip install (arm64)", log=log)
    (work / READY).write_text(json.dumps({"suite": SUITE, "python": minor, "packages": versions}, indent=1))
    if root.exists():
        shutil.rmtree(root)
    work.rename(root)
    echo(f"arm64 environment ready: {root}")
    return root
