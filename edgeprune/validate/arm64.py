"""Validation on arm64 kernels: a classifier artifact run by the aarch64 build of ONNX Runtime under qemu
(:mod:`.arm64_env`), against the same artifact run by the host's x86_64 build, on the task's validation split.

For each emulated CPU (``neoverse-n1``: NEON with the dot-product int8 kernels; ``cortex-a72``: plain NEON) it
records accuracy, agreement of the labels with the x86 run and the largest logit difference, and which int8
kernels the CPU's hwcaps select (read inside the emulated process with ``getauxval``: ``asimddp`` -> MLAS's
SDOT/UDOT kernels). Both runs feed the same batches (``EdgeModel.logits``), so a difference is the kernels', not
the batching's (dynamic int8 quantizes activations per batch). Emulated time is not device latency (about 50x
slower, DESIGN.md section 11): nothing here claims speed.

The results go into the artifact's manifest (``arm64_emulation``), ``report.json`` and ``report.md``, each file
replaced atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

import edgeprune
from edgeprune.errors import ConfigError, EmulationError
from edgeprune.runtime.manifest import MANIFEST, read_json, require_artifact
from edgeprune.validate.arm64_env import CPUS, require

RUNNER = r'''
import ctypes, json, platform, sys, numpy as np, onnxruntime
from edgeprune.runtime import EdgeModel
job = json.load(open(sys.argv[1]))
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
hw, hw2 = libc.getauxval(16), libc.getauxval(26)
caps = {"asimd": hw >> 1 & 1, "asimddp": hw >> 20 & 1, "sve": hw >> 22 & 1, "i8mm": hw2 >> 13 & 1,
        "sme": hw2 >> 23 & 1}
model = EdgeModel(job["artifact"], threads=job["threads"])
texts, pairs, step = job["texts"], job["pairs"], job["batch_size"]
out = []
for start in range(0, len(texts), step):
    out.append(model.logits(texts[start:start + step], pairs[start:start + step] if pairs else None, step))
    print(min(start + step, len(texts)), flush=True)
np.save(job["out"], np.concatenate(out))
json.dump({"machine": platform.machine(), "onnxruntime": onnxruntime.__version__, "hwcaps": caps},
          open(job["info"], "w"))
'''


def run_emulated(artifact: Path, cpu: str, texts: Sequence[str], pairs: Optional[Sequence[str]], batch_size: int,
                 progress: Callable[[int], None] = lambda done: None, threads: int = 1) -> tuple[np.ndarray, dict]:
    """Logits of ``artifact`` on ``texts`` from ONNX Runtime's aarch64 build on the emulated ``cpu``."""
    root = require()
    spec = CPUS[cpu]
    for stale in (root / "tmp").glob("edgeprune-*"):  # left by a killed run (a live one is younger than a day)
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="edgeprune-", dir=root / "tmp"))
    inside = Path("/") / work.relative_to(root)
    cpuinfo = root / "proc" / "cpuinfo"  # the root's /proc is not mounted: the file is what the guest reads
    try:
        shutil.copytree(Path(edgeprune.__file__).parent, work / "src" / "edgeprune",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(artifact, work / "artifact", ignore=shutil.ignore_patterns("demo"))
        (work / "runner.py").write_text(RUNNER)
        (work / "job.json").write_text(json.dumps({
            "artifact": str(inside / "artifact"), "texts": list(texts), "pairs": list(pairs) if pairs else None,
            "batch_size": batch_size, "threads": threads, "out": str(inside / "logits.npy"),
            "info": str(inside / "info.json")}))
        cpuinfo.parent.mkdir(exist_ok=True)
        cpuinfo.write_text(spec.cpuinfo())
        env = {"PATH": "/usr/bin:/bin", "QEMU_CPU": cpu, "PYTHONPATH": str(inside / "src"), "HOME": "/root",
               "OMP_NUM_THREADS": str(threads)}
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        proc = subprocess.Popen([chroot, str(root), "/opt/venv/bin/python", str(inside / "runner.py"),
                                 str(inside / "job.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        for line in proc.stdout:
            if line.strip().isdigit():
                progress(int(line))
        err = proc.stderr.read()
        if proc.wait() != 0:
            last = (err.strip().splitlines() or [f"signal {-proc.returncode}" if proc.returncode < 0 else ""])[-1]
            raise EmulationError(f"the artifact failed on emulated {cpu} (exit {proc.returncode}): {last[:160]}")
        return np.load(work / "logits.npy"), json.loads((work / "info.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(host: np.ndarray, guest: np.ndarray, labels: Optional[Sequence[int]]) -> dict:
    """Agreement of the labels, logit differences and accuracy of both runs (rounded for the report)."""
    diff = np.abs(host - guest)
    out = {"agreement": round(float((host.argmax(-1) == guest.argmax(-1)).mean()), 4),
           "max_abs_logit_diff": float(f"{diff.max():.3g}"), "mean_abs_logit_diff": float(f"{diff.mean():.3g}")}
    if labels is not None:
        y = np.asarray(labels)
        out["accuracy_arm64"] = round(float((guest.argmax(-1) == y).mean()), 4)
        out["accuracy_x86_64"] = round(float((host.argmax(-1) == y).mean()), 4)
    return out


def validate_on_arm64(artifact: str | Path, cpus: Sequence[str] = ("neoverse-n1", "cortex-a72"),
                      limit: Optional[int] = None, batch_size: int = 32, record: bool = True,
                      echo: Callable[[str], None] = print, examples: Optional[Sequence] = None) -> dict:
    """Run ``artifact`` on each emulated CPU and on the host; record and return the comparison. ``examples``: the
    labelled examples to run (a build's own validation data); default the task's shipped validation split."""
    from tqdm import tqdm

    from edgeprune.runtime import EdgeModel
    from edgeprune.tasks import get_task, load_split

    artifact = Path(artifact)
    unknown = [c for c in cpus if c not in CPUS]
    if unknown:
        raise ConfigError(f"--cpu {unknown[0]}: unknown; give one of {', '.join(CPUS)}")
    require()  # before any work: set up, and this machine can still emulate
    if read_json(require_artifact(artifact) / MANIFEST, "manifest").get("kind") == "causal-lm":
        raise ConfigError(f"{artifact}: validate --on arm64 runs classifier artifacts; this one is a decoder")
    model = EdgeModel(artifact)
    manifest = model.manifest
    if examples is None:
        examples = load_split(get_task(manifest["task"]), "validation", limit=limit)
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if manifest.get("pair") else None
    labels = [e.label for e in examples]
    host = model.logits(texts, pairs, batch_size)
    result = {"split": "validation", "examples": len(texts), "batch_size": batch_size, "cpus": {},
              "note": "accuracy and parity on ONNX Runtime's aarch64 kernels under qemu user-mode emulation; "
                      "emulated time is not device latency and is not reported as such"}
    for cpu in cpus:
        bar = tqdm(total=len(texts), desc=f"arm64 {cpu}", unit="ex", leave=False)
        seen = [0]

        def step(done: int) -> None:
            bar.update(done - seen[0])
            seen[0] = done

        start = time.perf_counter()
        try:
            guest, info = run_emulated(artifact, cpu, texts, pairs, batch_size, step)
        finally:
            bar.close()
        row = compare(host, guest, labels)
        row.update(kernels=CPUS[cpu].kernels if info["hwcaps"]["asimddp"] or cpu != "neoverse-n1" else
                   "plain NEON (the emulated CPU did not expose asimddp)", hwcaps=info["hwcaps"],
                   onnxruntime=info["onnxruntime"], machine=info["machine"],
                   emulated_seconds=round(time.perf_counter() - start, 1))
        result["cpus"][cpu] = row
        echo(f"{cpu}: agreement {row['agreement']}, max logit diff {row['max_abs_logit_diff']}, accuracy "
             f"{row.get('accuracy_arm64')} (x86_64 {row.get('accuracy_x86_64')}); {row['kernels']}")
    if record:
        write_record(artifact, result)
    return result


def markdown(result: dict) -> str:
    lines = ["## On arm64 kernels (emulated)", "",
             f"ONNX Runtime's aarch64 build under qemu user mode, {result['examples']} examples of the "
             f"{result['split']} split in batches of {result['batch_size']}, against the x86_64 run of the same "
             "batches (`edgeprune validate DIR --on arm64`). Emulated time is not device latency: no speed is "
             "claimed here.", "",
             "| CPU | kernels | accuracy arm64 | accuracy x86_64 | agreement | max logit diff | mean logit diff |",
             "|---|---|---|---|---|---|---|"]
    for cpu, r in result["cpus"].items():
        lines.append(f"| {cpu} | {r['kernels']} | {r.get('accuracy_arm64', '')} | {r.get('accuracy_x86_64', '')} | "
                     f"{r['agreement']} | {r['max_abs_logit_diff']} | {r['mean_abs_logit_diff']} |")
    return "\n".join(lines) + "\n"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_record(artifact: Path, result: dict) -> None:
    """The result into ``edgeprune.json`` and ``report.json`` (key ``arm64_emulation``) and ``report.md``."""
    for name in ("edgeprune.json", "report.json"):
        path = artifact / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["arm64_emulation"] = result
            _replace(path, json.dumps(data, indent=2))
    report = artifact / "report.md"
    if report.is_file():
        text = report.read_text()
        head = text.split("## On arm64 kernels (emulated)")[0].rstrip("\n")
        rest = text.split("## On arm64 kernels (emulated)")[1] if "## On arm64 kernels" in text else ""
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        _replace(report, head + "\n\n" + markdown(result) + tail)
