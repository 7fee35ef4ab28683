// Classify texts with an edgeprune artifact's demo page in headless Chromium (Debian's, no download), driven
// through the DevTools protocol by puppeteer-core; the page runs transformers.js on ONNX Runtime Web (WASM).
// usage: node classify_browser.mjs DEMO_URL INPUT.json [SCREENSHOT.png]
//   INPUT.json as for classify_node.mjs; prints the same JSON (load_ms is the page's own model load time)
import { readFileSync } from "node:fs";
import puppeteer from "puppeteer-core";

const [url, inputFile, screenshot] = process.argv.slice(2);
const input = JSON.parse(readFileSync(inputFile, "utf8"));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         // CHROMIUM_ARGS: extra flags, e.g. "--enable-unsafe-webgpu" (headless Chromium's WebGPU, SwiftShader here)
         ...(process.env.CHROMIUM_ARGS ? process.env.CHROMIUM_ARGS.split(" ") : ["--disable-gpu"])],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => document.body.dataset.ready === "1", { timeout: 120000 })
    .catch(() => { throw new Error("the demo page did not finish loading: " + errors.join("; ")); });
  const state = await page.evaluate(() => ({ error: window.edgeprune.error, load_ms: window.edgeprune.loadMs,
                                             backend: window.edgeprune.backend }));
  if (state.error) throw new Error("the demo page cannot run the model: " + state.error);
  const results = await page.evaluate(async (input) => {
    const out = [];
    for (const [i, text] of input.texts.entries()) {
      const ms = [];
      let r;
      for (let k = 0; k < (input.repeat || 1); k++) {
        r = await window.edgeprune.classify(text, input.pairs ? input.pairs[i] : "");
        ms.push(r.ms);
      }
      out.push({ label: r.label, probs: r.probs, ms });
    }
    return out;
  }, input);
  if (screenshot) {  // a person's use of the page: type, click, look
    await page.$eval("#text", (el) => { el.value = ""; });
    await page.type("#text", input.texts[0] || "a gorgeous, witty, seductive movie.");
    await page.click("#go");
    await page.waitForFunction(() => document.getElementById("status").textContent.includes("ms for this text"));
    await page.setViewport({ width: 800, height: 520 });
    await page.screenshot({ path: screenshot });
  }
  console.log(JSON.stringify({ load_ms: state.load_ms, backend: state.backend, threads: await page.evaluate(() => window.edgeprune.manifest.threads), results }));
} finally {
  await browser.close();
}
