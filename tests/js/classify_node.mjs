// Classify texts with an edgeprune artifact through transformers.js in Node (onnxruntime-node, CPU).
// usage: node classify_node.mjs ARTIFACT_DIR INPUT.json
//   INPUT.json: {"texts": [...], "pairs": [...] | null, "repeat": 1}
// prints {"load_ms", "results": [{"label", "probs" (in the manifest's label order), "ms": [per call]}]}
import { readFileSync } from "node:fs";
import path from "node:path";
import { pipeline, env, AutoTokenizer, AutoModelForSequenceClassification } from "@huggingface/transformers";

const [dir, inputFile] = process.argv.slice(2);
const input = JSON.parse(readFileSync(inputFile, "utf8"));
const manifest = JSON.parse(readFileSync(path.join(dir, "edgeprune.json"), "utf8"));
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(dir)) + path.sep;
const t0 = performance.now();
const id = path.basename(path.resolve(dir));
const session_options = { intraOpNumThreads: manifest.threads || 1, interOpNumThreads: 1 };
let clf;
if (manifest.pair) {  // the text-classification pipeline takes single texts: tokenizer + model for pairs
  const tok = await AutoTokenizer.from_pretrained(id);
  const model = await AutoModelForSequenceClassification.from_pretrained(id, { session_options });
  clf = async (x) => {
    const z = Array.from((await model(tok(x.text, { text_pair: x.text_pair, truncation: true }))).logits.data);
    const e = z.map((v) => Math.exp(v - Math.max(...z)));
    const s = e.reduce((a, b) => a + b);
    return e.map((v, i) => ({ label: manifest.labels[i], score: v / s })).sort((a, b) => b.score - a.score);
  };
} else {
  clf = await pipeline("text-classification", id, { session_options });
}
const load_ms = performance.now() - t0;
const results = [];
for (const [i, text] of input.texts.entries()) {
  const arg = manifest.pair ? { text, text_pair: input.pairs[i] } : text;
  const ms = [];
  let out;
  for (let r = 0; r < (input.repeat || 1); r++) {
    const s = performance.now();
    out = await clf(arg, { top_k: null });
    ms.push(performance.now() - s);
  }
  const scores = Object.fromEntries(out.map((o) => [o.label, o.score]));
  results.push({ label: out[0].label, probs: manifest.labels.map((l) => scores[l]), ms });
}
console.log(JSON.stringify({ load_ms, results }));
