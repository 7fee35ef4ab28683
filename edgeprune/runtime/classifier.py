"""Running an edgeprune artifact from an app: ONNX Runtime, tokenizers and numpy only (no torch, no
transformers), so it works wherever ONNX Runtime does.

    from edgeprune.runtime import EdgeModel
    model = EdgeModel("build/sst2-arm64")
    model.predict(["a gorgeous, witty film"])          # ['positive']
    model.predict_proba(["premise"], pairs=["hypothesis"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edgeprune.errors import ModelError
from edgeprune.runtime import layout
from edgeprune.runtime.manifest import MANIFEST, check_against, read_manifest, session_threads, top_k_feed
from edgeprune.tasks.prompts import LabelWords


class EdgeModel:
    """A built artifact directory (``onnx/model_quantized.onnx`` or ``model.ort``, ``tokenizer.json``,
    ``edgeprune.json``: :mod:`edgeprune.runtime.layout`)."""

    def __init__(self, path: str | Path, threads: Optional[int] = None, prefer_ort: bool = True,
                 top_k: Optional[int] = None):
        """``top_k``: experts per token for an artifact whose routers read it at run time (the manifest's
        ``top_k``: default and maximum; fewer is faster, as llama.cpp's expert_used_count); None: the model's own."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.top_k = top_k_feed(self.manifest, top_k)
        self.labels: list[str] = list(self.manifest["labels"])
        self.max_length: int = int(self.manifest["max_length"])
        self.fixed = self.manifest.get("fixed_shape")  # [batch, length] or None
        self.pad_id: int = int(self.manifest.get("pad_id", 0))  # decoder classifiers find the last token by it
        model_file = layout.model_file(self.path, self.manifest, prefer_ort)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = session_threads(threads or self.manifest.get("threads", 1))
        opts.log_severity_level = 3
        # optimizers the build measured as slower for this graph (e.g. SkipLayerNormFusion): see the target notes
        self.disabled_optimizers: list[str] = list(self.manifest.get("ort_disabled_optimizers") or [])
        try:
            self.session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=self.disabled_optimizers)
        except Exception as exc:  # ONNX Runtime raises its own types for missing, empty and corrupt files
            detail = str(exc).split(" : ")[-1].splitlines()[0][:100] if str(exc) else ""
            raise ModelError(f"{model_file}: ONNX Runtime cannot load it ({type(exc).__name__}: {detail}); rebuild "
                             "the artifact") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.labels):
            raise ModelError(f"{self.path / MANIFEST}: {len(self.labels)} labels but the model has {width} outputs; "
                             "rebuild the artifact")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise ModelError(f"{self.path / 'tokenizer.json'}: not a readable tokenizer ({str(exc)[:100]}); rebuild "
                             "the artifact") from None
        check_against(self.manifest, self.path, self.input_names, self.tokenizer.get_vocab_size())
        # a language model classifies by label words: texts are rendered into its prompt and truncated on the left
        words = self.manifest.get("label_words")
        self.label_words: Optional[LabelWords] = LabelWords.from_dict(words) if words else None
        self.tokenizer.enable_truncation(self.max_length if not self.fixed else min(self.max_length, self.fixed[1]),
                                         direction="left" if self.label_words else "right")
        self.tokenizer.no_padding()

    def _feeds(self, texts: Sequence[str], pairs: Optional[Sequence[str]]) -> dict[str, np.ndarray]:
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        if (pairs is not None) != bool(self.manifest.get("pair")):
            raise ValueError("this artifact classifies text pairs: give pairs" if self.manifest.get("pair") else
                             "this artifact classifies single texts: give no pairs")
        if self.label_words is not None:
            inputs = [self.label_words.render(t, p) for t, p in zip(texts, pairs or [None] * len(texts))]
        else:
            inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
        encs = self.tokenizer.encode_batch(inputs)
        width = self.fixed[1] if self.fixed else max(len(e.ids) for e in encs)
        feeds = {n: np.zeros((len(encs), width), dtype=np.int64) for n in ("input_ids", "attention_mask",
                                                                             "token_type_ids")}
        feeds["input_ids"][:] = self.pad_id
        for row, e in enumerate(encs):
            n = len(e.ids)
            feeds["input_ids"][row, :n] = e.ids
            feeds["attention_mask"][row, :n] = e.attention_mask
            feeds["token_type_ids"][row, :n] = e.type_ids
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def logits(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None, batch_size: int = 32) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(pairs, str):
            pairs = [pairs]
        if len(texts) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        step = self.fixed[0] if self.fixed else batch_size
        out = []
        for start in range(0, len(texts), step):
            chunk = list(texts[start : start + step])
            pchunk = list(pairs[start : start + step]) if pairs is not None else None
            feeds = self._feeds(chunk, pchunk)
            n = len(chunk)
            if self.fixed and n < self.fixed[0]:
                feeds = {k: np.concatenate([v, np.full((self.fixed[0] - n, v.shape[1]), self.pad_id if k == "input_ids"
                                                       else 0, v.dtype)]) for k, v in feeds.items()}
            if self.top_k is not None:  # the routers' run-time top-k (not a batch input: no padding)
                feeds["top_k"] = self.top_k
            out.append(self.session.run(["logits"], feeds)[0][:n].astype(np.float32))
        return np.concatenate(out)

    def predict_proba(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
                      batch_size: int = 32) -> np.ndarray:
        """Class probabilities, columns in the order of :attr:`labels`. An int8-dynamic graph quantizes its
        activations per batch (one scale per tensor, padding included), so a text's probabilities move slightly
        with its batch neighbours (up to 0.02 seen on sst2); ``batch_size=1`` gives what a one-text app sees."""
        z = self.logits(texts, pairs, batch_size)
        z = z - z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=-1, keepdims=True)

    def predict(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None, batch_size: int = 32) -> list[str]:
        """Label names."""
        return [self.labels[i] for i in self.logits(texts, pairs, batch_size).argmax(axis=-1)]
