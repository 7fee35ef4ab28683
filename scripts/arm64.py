"""results/arm64.md: built artifacts on ONNX Runtime's arm64 kernels under qemu (``edgeprune validate --on arm64``).

    python scripts/arm64.py build/sst2-arm64 build/mnli-arm64 --limit mnli=1500 --out results/arm64

Needs the emulated environment (``edgeprune emulate setup``, once). Each artifact is copied first (the copy gets the
record; the artifact stays as it was), then run on neoverse-n1 and cortex-a72 against the host's x86_64 build on
the same batches. Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from edgeprune.validate.arm64 import markdown, validate_on_arm64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--limit", action="append", default=[], help="TASK=N: first N of a seeded shuffle (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("results/arm64"))
    args = ap.parse_args()
    limits = {k: int(v) for k, v in (s.split("=") for s in args.limit)}
    rows, sections = {}, []
    for art in args.artifacts:
        manifest = json.loads((art / "edgeprune.json").read_text())
        task = manifest["task"]
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / art.name
            shutil.copytree(art, copy)
            start = time.perf_counter()
            result = validate_on_arm64(copy, limit=limits.get(task))
        result.update(artifact=str(art), task=task, target=manifest.get("target"),
                      quantization=manifest.get("quantization"), command=manifest.get("command"),
                      wall_seconds=round(time.perf_counter() - start))
        rows[str(art)] = result
        q = manifest.get("quantization") or {}
        sections.append(f"### {task}: `{art}` ({manifest.get('target')}, {q.get('precision')}; embedding: "
                        f"{q.get('embedding', 'int8 with the rest')})\n\n" + markdown(result).split("\n", 2)[2])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"host": platform.processor() or platform.machine(),
                                                     "results": rows}, indent=1))
    cmd = "python scripts/arm64.py " + " ".join(map(str, args.artifacts)) + "".join(f" --limit {s}" for s in args.limit)
    Path(f"{args.out}.md").write_text(
        "# Artifacts on arm64 kernels (emulated)\n\n"
        f"`{cmd} --out {args.out}` after `edgeprune emulate setup`. ONNX Runtime's aarch64 wheel of the host's "
        "version runs under qemu user mode in an arm64 Debian root, on a Graviton-class core (neoverse-n1: NEON "
        "with the dot-product int8 kernels) and a Raspberry-Pi-class core (cortex-a72: plain NEON); the same "
        "batches go through the host's x86_64 build. Accuracy and agreement are real arm64-kernel numbers; "
        "emulated time is not device latency and none is claimed.\n\n" + "\n".join(sections))
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
