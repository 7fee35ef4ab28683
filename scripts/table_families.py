"""Every transformers 5 family of ``models/families/table.py`` through ``edgeprune build`` on a tiny random checkpoint
(with the adapter files of tests/test_table_families.py ``FILES``).

    python scripts/table_families.py                  # -> results/table_families.md / .json
    python scripts/table_families.py --families qwen3_next lfm2_moe           # only these
    python scripts/table_families.py --families jetmoe --merge                # these, the other rows kept

The checkpoints are the ones tests/test_table_families.py builds (hidden 32, 2 layers, 4 experts, top-2, routers
N(0, 1), the whole multimodal model where the family is multimodal), saved with ``save_pretrained`` as a user's
directory; each is built for x86_64 (int8 dynamic) at k = 2 and k = 1 (reap, 32 calibration examples, no recovery)
with the target's budgets loosened (a random model meets none). Recorded per build: the export path, the parity of
the fp32 export with PyTorch (max |logit| difference over the parity sample at batch 1, 7, 32) and of the int8
artifact's agreement with the original, the original / artifact size ratio, and the wall time of the build. The
weights are random: accuracy means nothing here and is not reported; speed ratios at hidden 32 say nothing of real
models and are not reported either (results/families.md has the hidden-256 runs of the 4.57 families).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from click.testing import CliRunner  # noqa: E402

from edgeprune.cli import main  # noqa: E402
from edgeprune.models.families.table import ROWS  # noqa: E402
from tests.test_table_families import FILES  # noqa: E402
from edgeprune.validate.results import write_results  # noqa: E402

FAST = ["--calibration-examples", "32", "--recovery-steps", "0", "--eval-examples", "64", "--latency-iters", "5",
        "--method", "reap"]


def checkpoint(family: str, root: Path) -> tuple[Path, list[str]]:
    """The tiny checkpoint of tests/test_table_families.py and the label-word options it needs."""
    from tests.conftest import make_bpe_tokenizer, make_tokenizer
    from tests.test_table_families import BPE, WORDS, save_tiny

    d = root / family
    save_tiny(family, d, *(make_bpe_tokenizer if family in BPE else make_tokenizer)(d))
    arch = json.loads((d / "config.json").read_text())["architectures"][0]
    return d, ([] if arch.endswith("ForSequenceClassification") else WORDS)


def build(d: Path, k: int, words: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["build", "--model", str(d), "--target", "x86_64", "--experts", str(k),
                                    "--out", str(out)] + FAST + words)
    row = {"k": k, "exit": res.exit_code, "seconds": round(time.perf_counter() - t0, 1)}
    if res.exit_code != 0:
        row["said"] = (res.output.strip().splitlines() or [""])[-1][:200]
        return row
    r = json.loads((out / "report.json").read_text())
    e = r["export"]
    row.update(exporter=e["exporter"], parity=e["parity_fp32"]["max_abs_logit_diff"],
               agreement=r["quality"]["agreement"], size_ratio=r["size"]["size_ratio"],
               top_k=f"1..{e['top_k']['max']}" if e.get("top_k") else ("fixed: " + e["top_k_fixed"][:60]
                                                                        if e.get("top_k_fixed") else "-"))
    return row


def main_(families: list[str], out: str, merge: bool = False) -> None:
    from tests.conftest import write_loose_profiles

    rows = []
    kept = [r for r in json.loads(Path(out).with_suffix(".json").read_text())["rows"] if r["family"] not in families] \
        if merge else []
    with tempfile.TemporaryDirectory(prefix="edgeprune-table-") as tmp:
        root = Path(tmp)
        os.environ["EDGEPRUNE_TARGETS"] = str(write_loose_profiles(root / "targets"))
        os.environ["EDGEPRUNE_CACHE"] = str(root / "cache")
        for i, family in enumerate(families, 1):
            print(f"[{i}/{len(families)}] {family}", flush=True)
            d, words = checkpoint(family, root / "ckpt")
            for k in (2, 1):
                rows.append({"family": family, **build(d, k, words, root / "art" / f"{family}-{k}")})
                print("   ", rows[-1], flush=True)
    rows = sorted(kept + rows, key=lambda r: (r["family"], -r["k"]))
    md = ["# transformers 5 families (models/families/table.py) through the build, tiny random checkpoints", "",
          "Command: `python scripts/table_families.py` (rows of a family added later: `--families F --merge`)", "", __doc__.split("\n\n", 2)[2].strip(), "",
          "| family | k | exit | export path | fp32 parity | artifact agreement | size ratio | run-time top-k | build s "
          "| said |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        md.append(f"| {r['family']} | {r['k']} | {r['exit']} | {r.get('exporter', '-')} | {fmt(r.get('parity'), '.1e')} "
                  f"| {fmt(r.get('agreement'), '.3f')} | {fmt(r.get('size_ratio'), '.2f')} | {r.get('top_k', '?')} "
                  f"| {r['seconds']} "
                  f"| {r.get('said', '')} |")
    write_results(out, {"rows": rows}, md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=sorted(ROWS) + FILES)
    ap.add_argument("--out", default=str(ROOT / "results" / "table_families"))
    ap.add_argument("--merge", action="store_true", help="keep the other families' rows of the existing results")
    a = ap.parse_args()
    main_(a.families, a.out, a.merge)
