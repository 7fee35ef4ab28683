"""results/moe_operators_lm.md: a k > 1 decoder's experts as dense dispatch or in QMoE, decoding side by side.

    python scripts/moe_operators_lm.py --out results/moe_operators_lm

A Mixtral-shaped causal LM (hidden 1024 x 2 layers and 2048 x 1, FFN 3.5x, 8 experts, top-2, 8,000-word vocabulary,
random weights: speed, size and parity do not depend on training) is pruned to 4 experts with top-2 and to 2 of 2,
then goes through the build's own decoder export and quantization (``write_decoder``, ``parity``, ``weight_variant``
with the x86_64 profile's ``[generate]`` settings: RTN, a zero point per block, blocks of 32, int8 compute, 4-bit
embedding) with each ``[generate].moe_operator``: ``dense`` (every kept expert a MatMulNBits pair) and ``qmoe``
(com.microsoft.MoE in the fp32 graph, QMoE with 8- / 4-bit experts in the int8 / int4 graphs; only the routed 2
experts computed per token). For each graph: size (graph + external data) and its ratio to the fp32 original (8
experts), decode tokens/s and time to first token (a 64-token prompt, 32 new tokens, batch 1, EdgeLM with its KV
cache; median of interleaved rounds, with 1 and 2 threads; ratios to dense dispatch of the same precision in the same
run), the fp32 graph's parity with PyTorch (greedy tokens equal, max logit difference), each graph's next-token
argmax at every prompt position against the fp32 dense graph's (teacher-forced) and its largest logit difference
there, and each variant's greedy agreement with its own fp32 graph (a random model's logits are nearly flat, so
one flipped token changes the rest of a continuation: the teacher-forced agreement is the steadier measure).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeprune.export.lm_export import FILES, parity, weight_variant, write_decoder  # noqa: E402
from edgeprune.export.quantize import size_mb  # noqa: E402
from edgeprune.models.registry import adapter_for  # noqa: E402
from edgeprune.pruning.apply import apply_plan  # noqa: E402
from edgeprune.pruning.plan import LayerPlan, PrunePlan  # noqa: E402
from edgeprune.runtime.decoder import EdgeLM  # noqa: E402
from edgeprune.targets import load_target  # noqa: E402

PROMPTS = ["a gorgeous , witty , seductive movie .", "the story is bland and the acting is flat",
           "it 's a charming film", "an hour and a half of tedium"]


def checkpoint(hidden: int, layers: int, keep: int, tok_dir: Path, out: Path, seed: int = 0):
    """The pruned model (its first ``keep`` experts kept; which ones does not matter for speed) and its directory."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=int(hidden * 3.5),
                        num_hidden_layers=layers, num_attention_heads=hidden // 64,
                        num_key_value_heads=max(1, hidden // 256), num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # routers that spread tokens over the experts
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 1.0)
    original_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    adapter = adapter_for(model.config)
    plan = PrunePlan("first-k", [LayerPlan(l, 8, [0.0] * 8, [[(e, 1.0)] for e in range(keep)])
                                 for l in adapter.blocks(model)])
    model = apply_plan(model, plan, fold=False).eval()
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return model, original_mb


def graphs(model, d: Path, root: Path, op: str, gen) -> tuple[Path, dict, dict]:
    art = root / op
    info = write_decoder(model, d, art, exporter="torch.onnx", moe_operator=op)
    info["parity"] = parity(model, art, PROMPTS, 8, 1e-3)
    variants = {p: weight_variant(art, p, PROMPTS, 16, gen.block_size, gen.accuracy_level, gen.algorithm,
                                  gen.embedding_weights, symmetric=gen.symmetric) for p in ("int8", "int4")}
    return art, info, variants


def speed(lms: dict, ids: list[int], new: int, rounds: int) -> dict:
    """Median decode tokens/s and first-token ms of each EdgeLM, rounds interleaved."""
    got = {k: {"rate": [], "ttft": []} for k in lms}
    for lm in lms.values():
        list(lm.generate_ids(ids, 4, ignore_eos=True))
    for _ in range(rounds):
        for k, lm in lms.items():
            t0 = time.perf_counter()
            stamps = [time.perf_counter() for _ in lm.generate_ids(ids, new, ignore_eos=True)]
            got[k]["ttft"].append((stamps[0] - t0) * 1e3)
            got[k]["rate"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {k: (statistics.median(v["rate"]), statistics.median(v["ttft"])) for k, v in got.items()}


def _agreement(rows: list[dict], built: dict) -> None:
    """Each graph's next-token argmax at every position of the prompts (teacher-forced) against the fp32 dense
    graph's (= PyTorch within the parity), and its largest logit difference there."""
    import numpy as np

    ref_lm = EdgeLM(built["dense"])
    seqs = [ref_lm.prompt_ids(p, 8) for p in PROMPTS]
    ref = [ref_lm.logits(ids) for ids in seqs]
    for r in rows:
        lm = EdgeLM(built[r["operator"]], model_file=FILES[r["precision"]])
        got = [lm.logits(ids) for ids in seqs]
        same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got, ref))
        r["next_token_agreement_with_fp32"] = round(same / sum(len(x) for x in ref), 4)
        r["max_logit_diff_vs_fp32"] = float(f"{max(float(np.abs(a - b).max()) for a, b in zip(got, ref)):.3g}")


def measure(hidden: int, layers: int, keep: int, tok_dir: Path, rounds: int) -> list[dict]:
    gen = load_target("x86_64").generate
    rows = []
    with tempfile.TemporaryDirectory(prefix="moe-lm-") as tmp:
        root = Path(tmp)
        model, original_mb = checkpoint(hidden, layers, keep, tok_dir, root / "ckpt")
        built = {}
        for op in ("dense", "qmoe"):
            t0 = time.perf_counter()
            art, info, variants = graphs(model, root / "ckpt", root, op, gen)
            built[op] = art
            for precision in ("fp32", "int8", "int4"):
                v = variants.get(precision, {})
                mb = size_mb(art / FILES[precision])
                rows.append({"hidden": hidden, "layers": layers, "experts": f"{keep} of 8, top-2", "operator": op,
                             "precision": precision, "exporter": info["exporter"], "experts_storage": v.get("experts", ""),
                             "mb": mb, "x_smaller_than_original": round(original_mb / mb, 2),
                             "fp32_parity": info["parity"]["max_abs_logit_diff"] if precision == "fp32" else None,
                             "greedy_agreement_with_fp32": v.get("greedy_token_agreement_with_fp32", 1.0),
                             "seconds": round(time.perf_counter() - t0)})
                print(f"hidden {hidden}, {keep} kept, {op} {precision}: {mb} MB", flush=True)
        _agreement(rows, built)
        ids = EdgeLM(built["dense"]).prompt_ids(" ".join(PROMPTS * 8), 32)[-64:]
        for threads in (1, 2):
            lms = {(r["operator"], r["precision"]): EdgeLM(built[r["operator"]], threads=threads,
                                                           model_file=FILES[r["precision"]]) for r in rows}
            res = speed(lms, ids, 32, rounds)
            for r in rows:
                rate, ttft = res[(r["operator"], r["precision"])]
                r[f"tokens_per_s_{threads}t"], r[f"ttft_ms_{threads}t"] = round(rate, 1), round(ttft, 1)
                r[f"vs_dense_{threads}t"] = round(rate / res[("dense", r["precision"])][0], 2)
    for r in rows:
        r["original_fp32_mb"] = round(original_mb, 1)
    return rows


def _parity(r: dict) -> str:
    return "" if r["fp32_parity"] is None else f"{r['fp32_parity']:.1e}"


def table(rows: list[dict]) -> str:
    head = ("| hidden x layers | experts | operator | weights | MB | x smaller than fp32 original | tokens/s 1t | "
            "vs dense 1t | tokens/s 2t | vs dense 2t | first token ms 1t | fp32 parity | next-token agreement with fp32 | "
            "max logit diff vs fp32 | greedy agreement with fp32 |\n|" + "---|" * 15 + "\n")
    return head + "".join(
        f"| {r['hidden']} x {r['layers']} | {r['experts']} | {r['operator']} | {r['precision']} | {r['mb']} | "
        f"{r['x_smaller_than_original']} | {r['tokens_per_s_1t']} | {r['vs_dense_1t']}x | {r['tokens_per_s_2t']} | "
        f"{r['vs_dense_2t']}x | {r['ttft_ms_1t']} | {_parity(r)} | {r['next_token_agreement_with_fp32']} | "
        f"{r['max_logit_diff_vs_fp32']} | {r['greedy_agreement_with_fp32']} |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 1], help="layers at each --hidden")
    ap.add_argument("--keep", type=int, nargs="+", default=[4, 2], help="experts kept of 8 (top-2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results/moe_operators_lm"))
    args = ap.parse_args()
    from tests.conftest import make_bpe_tokenizer

    rows = []
    with tempfile.TemporaryDirectory(prefix="moe-lm-tok-") as t:
        tok_dir = Path(t) / "tokenizer"
        make_bpe_tokenizer(tok_dir, vocab_size=8000)
        for hidden, layers in zip(args.hidden, args.layers):
            for keep in args.keep:
                rows += measure(hidden, layers, keep, tok_dir, args.rounds)
    Path(f"{args.out}.json").write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=1))
    Path(f"{args.out}.md").write_text(
        "# A k > 1 decoder's experts: dense dispatch and QMoE, decoding side by side\n\n"
        f"`python scripts/moe_operators_lm.py --hidden {' '.join(map(str, args.hidden))} --layers "
        f"{' '.join(map(str, args.layers))} --keep {' '.join(map(str, args.keep))} --out {args.out}` (ONNX Runtime "
        f"{ort.__version__}, CPU provider, this host). {__doc__.split(chr(10), 3)[3]}\n" + table(rows))
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
