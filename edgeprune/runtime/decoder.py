"""``EdgeLM``: text generation from a decoder artifact with a KV cache, on onnxruntime + tokenizers + numpy only.

The graph is the one optimum's ``text-generation-with-past`` export writes (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key / .value`` -> ``logits``, ``present.{i}.key / .value``), or
onnxruntime-genai's model builder (the same names; LFM2's convolution layers add a fixed-size state
``past.{i}.conv`` -> ``present.{i}.conv``): the prompt goes through once with an empty cache, then one token per
step with the state the previous step returned.

    lm = EdgeLM("build/lm")                                  # edgeprune.json, or a plain optimum export folder
    lm.generate("Review: a gorgeous film\\nSentiment:", max_new_tokens=8)            # greedy
    lm.generate(prompt, max_new_tokens=32, temperature=0.8, top_p=0.9, seed=0, stop=["\\n"])
    for piece in lm.stream(prompt, max_new_tokens=32): print(piece, end="")

A prompt longer than the context leaves room for ``max_new_tokens`` by dropping its oldest tokens (said in
``lm.last["truncated"]`` and by ``edgeprune generate`` on stderr); an empty prompt starts from the BOS token, or is
refused (one line) when the tokenizer has none.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from edgeprune.errors import ConfigError, ModelError


def config_head_dim(cfg: dict):
    """The attention head size a decoder's config.json states (``head_dim``, else hidden size / heads; None); a
    multimodal checkpoint's (its ``text_config``: the model builder writes the text model of Qwen3.5-MoE, Gemma 4)."""
    cfg = cfg.get("text_config") or cfg
    heads = cfg.get("num_attention_heads")
    return cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)


def _model_path(d: Path, manifest: dict, variant: Optional[str], model_file: Optional[str]) -> Path:
    """The graph an :class:`EdgeLM` runs: ``model_file``, the manifest's ``variant``, or the artifact's own."""
    from edgeprune.runtime.layout import file_inside

    if variant and not model_file:
        known = manifest.get("variants") or {}
        if variant not in known:
            raise ConfigError(f"{d}: no {variant!r} variant (has: {', '.join(known) or 'none'}); list it in the "
                              "target's [generate] variants (or `edgeprune export-lm --int4`)")
        model_file = known[variant]["model_file"]
    model = file_inside(d, model_file or manifest.get("model_file", "model.onnx"), "model_file")
    if not model.is_file():
        model = next((p for p in (d / "onnx" / "model.onnx", d / "model.onnx") if p.is_file()), model)
    return model


class EdgeLM:
    def __init__(self, directory: str | Path, threads: Optional[int] = None, variant: Optional[str] = None,
                 model_file: Optional[str] = None, top_k: Optional[int] = None):
        """``top_k``: experts per token for a k > 1 artifact whose routers read it at run time (the manifest's
        ``top_k``: default and maximum; fewer is faster, as llama.cpp's expert_used_count); None: the model's own."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        d = Path(directory)
        if not d.is_dir():  # (a folder without edgeprune.json is taken as a plain KV-cache export)
            from edgeprune.runtime.manifest import require_artifact

            require_artifact(d)
        from edgeprune.runtime.manifest import read_decoder_manifest, session_threads

        manifest = read_decoder_manifest(d)
        from edgeprune.runtime.manifest import top_k_feed

        self.top_k = top_k_feed(manifest, top_k)
        model = _model_path(d, manifest, variant, model_file)
        if not model.is_file() or not (d / "tokenizer.json").is_file():
            raise ModelError(f"{d}: needs the ONNX model ({model.name}) and tokenizer.json; is it a decoder artifact?")
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        gen = json.loads((d / "generation_config.json").read_text()) if (d / "generation_config.json").is_file() else {}
        opts = ort.SessionOptions()
        if threads or manifest.get("threads"):
            opts.intra_op_num_threads = session_threads(threads or manifest["threads"])
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        self.past_names = [n for n in names if n.startswith(("past_key_values.", "past."))]
        if not any(n.startswith("past_key_values.") for n in self.past_names):
            raise ModelError(f"{model}: no past_key_values inputs; export with task text-generation-with-past")
        self.inputs = set(names)
        # multimodal rotary (Qwen3.5's mrope, the model builder's text graph): position ids [3, batch, seq], one row
        # per section, all equal for text
        self.position_rows = next((i.shape[0] for i in self.session.get_inputs()
                                   if i.name == "position_ids" and len(i.shape) == 3), None)
        self.kv = {i.name: i for i in self.session.get_inputs() if i.name in self.past_names}
        # each state output (present.{i}.key / .value, present.{i}.conv) feeds the input of the same suffix
        by_suffix = {n.split(".", 1)[1]: n for n in self.past_names}
        self.carry = {o.name: by_suffix[o.name.split(".", 1)[1]] for o in self.session.get_outputs()[1:]
                      if o.name.startswith("present") and o.name.split(".", 1)[1] in by_suffix}
        self.state_outputs = [o.name for o in self.session.get_outputs()[1:]]
        self.head_dim = config_head_dim(cfg)  # where the graph leaves it symbolic (genai 0.18's builder)
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tokenizer.no_truncation()  # the context is handled here (left truncation, said), not by the file's setting
        self.tokenizer.no_padding()
        eos = manifest.get("eos_token_ids", gen.get("eos_token_id", cfg.get("eos_token_id")))
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.bos = manifest.get("bos_token_id", gen.get("bos_token_id", cfg.get("bos_token_id")))
        self.context = int(manifest.get("context") or (cfg.get("text_config") or cfg).get("max_position_embeddings")
                           or 2048)
        self.last: dict = {}

    def _empty_past(self) -> dict[str, np.ndarray]:
        """The state before the first token: every layer's key / value cache with no position, and the fixed-size
        state of a convolution layer (onnxruntime-genai's LFM2 graphs: ``past.{i}.conv`` [batch, channels,
        kernel - 1]) as zeros, which is what the layer's causal padding is."""
        feeds = {}
        for name, meta in self.kv.items():
            dtype = np.float16 if "16" in meta.type else np.float32
            if not name.startswith("past_key_values."):
                if not all(isinstance(d, int) for d in meta.shape[1:]):
                    raise ModelError(f"the graph's state {name} has no fixed size ({meta.shape})")
                feeds[name] = np.zeros((1, *meta.shape[1:]), dtype=dtype)
                continue
            heads, dim = meta.shape[1], meta.shape[3]
            dim = dim if isinstance(dim, int) and dim > 0 else self.head_dim
            if not isinstance(heads, int) or not isinstance(dim, int):
                raise ModelError(f"the graph's {name} has no fixed head count / size ({meta.shape})")
            feeds[name] = np.zeros((1, heads, 0, dim), dtype=dtype)
        return feeds

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits at every position of ``ids`` (one pass, empty cache): (len(ids), vocab)."""
        return self.session.run(["logits"], self._feeds(ids, self._empty_past(), len(ids)))[0][0]

    def _feeds(self, step_ids: list[int], past: dict, total: int) -> dict[str, np.ndarray]:
        """One step's inputs: ``step_ids`` after ``total - len(step_ids)`` cached positions."""
        feeds = {"input_ids": np.array([step_ids], dtype=np.int64), **past}
        if self.top_k is not None:  # the routers' run-time top-k (an overridable initializer of the graph)
            feeds["top_k"] = self.top_k
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.inputs:
            pos = np.arange(total - len(step_ids), total, dtype=np.int64)[None]
            feeds["position_ids"] = pos if self.position_rows is None else np.stack([pos] * self.position_rows)
        return feeds

    def prompt_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        """The prompt's token ids as generation starts from them (BOS for an empty prompt; the oldest tokens
        dropped to leave ``max_new_tokens`` of room in the context, said in ``self.last``)."""
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            if self.bos is None:
                raise ConfigError("empty prompt and the tokenizer has no BOS token to start from; give some text")
            ids = [int(self.bos)]
        room = self.context - max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the model's "
                              f"{self.context}-token context; ask for fewer")
        self.last = {"prompt_tokens": len(ids), "truncated": max(0, len(ids) - room)}
        return ids[-room:]

    def tokens(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: Optional[int] = None, ignore_eos: bool = False) -> Iterator[int]:
        """The generated token ids one by one (stops at an EOS token, unless ``ignore_eos``: benchmarks, or after
        ``max_new_tokens``)."""
        self._check(max_new_tokens, temperature, top_p)
        return self.generate_ids(self.prompt_ids(prompt, max_new_tokens), max_new_tokens, temperature, top_p, seed,
                                 ignore_eos)

    @staticmethod
    def _check(max_new_tokens: int, temperature: float, top_p: float) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")

    def generate_ids(self, ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                     seed: Optional[int] = None, ignore_eos: bool = False) -> Iterator[int]:
        """:meth:`tokens` from prompt token ids (which must fit the context with ``max_new_tokens``)."""
        self._check(max_new_tokens, temperature, top_p)
        if not ids or len(ids) + max_new_tokens > self.context:
            raise ConfigError(f"{len(ids)} prompt tokens + {max_new_tokens} new ones do not fit the {self.context}-"
                              "token context (or the prompt is empty)")
        rng = np.random.default_rng(seed)
        past = self._empty_past()
        step_ids, total = ids, len(ids)
        for _ in range(max_new_tokens):
            out = self.session.run(None, self._feeds(step_ids, past, total))
            logits = out[0][0, -1].astype(np.float64)
            past = {self.carry[name]: v for name, v in zip(self.state_outputs, out[1:]) if name in self.carry}
            token = pick(logits, temperature, top_p, rng)
            yield token
            if token in self.eos and not ignore_eos:
                return
            step_ids, total = [token], total + 1

    def stream(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               stop: Sequence[str] = (), seed: Optional[int] = None) -> Iterator[str]:
        """The generated text piece by piece; ends at EOS, a stop string (not included) or ``max_new_tokens``."""
        got: list[int] = []
        sent = ""
        for token in self.tokens(prompt, max_new_tokens, temperature, top_p, seed):
            if token in self.eos:
                break
            got.append(token)
            text = self.tokenizer.decode(got)
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                if cut > len(sent):
                    yield text[len(sent):cut]
                return
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            # hold back what could still become a stop string
            hold = max((len(s) - 1 for s in stop if s), default=0)
            safe = len(text) - hold
            if safe > len(sent):
                yield text[len(sent):safe]
                sent = text[:safe]
        text = self.tokenizer.decode(got)
        if len(text) > len(sent):
            yield text[len(sent):]

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = (), seed: Optional[int] = None) -> str:
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_p, stop, seed))


def pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """Greedy at temperature 0; otherwise a sample from softmax(logits / T) restricted to the smallest set of
    tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(len(keep), p=q)])
