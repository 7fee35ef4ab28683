"""The large path of a causal LM's export (issue 26, :mod:`edgeprune.export.lm_large`) on tiny checkpoints: the graph
traced from the skeleton on the meta device with its weights read lazily computes what PyTorch does (ONNX Runtime's
KV-cache generation token for token, logits within 1e-4), the segmented whole-sequence parity gate passes and
fails where it must, and the one-weight-at-a-time int4 variant equals the in-memory quantizer's graph."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeprune.errors import ExportError
from edgeprune.export.lm_export import FILES, write_decoder
from tests.test_generation_build import lm_dirs, tiny_causal_lm  # noqa: F401  (the fixture)

PROMPTS = ["a gorgeous , witty film", "the plot is thin"]


@pytest.fixture(scope="module")
def pruned(lm_dirs, tmp_path_factory):
    """k = 1 (folded into Mistral) and k = 2 (Mixtral, dense dispatch) of the tiny Mixtral LM, streamed."""
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.pruning.pipeline import prune
    from edgeprune.models.tokenizer import copy_tokenizer
    from edgeprune.tasks import get_task
    from edgeprune.tasks.spec import DataSpec

    root, out = tmp_path_factory.mktemp("lm-large"), {}
    for k in (1, 2):
        cfg = PruneConfig(generate=True, recovery_steps=0, calibration_examples=24, experts=k, layerwise=True)
        streamed, _, _ = prune(lm_dirs["mixtral"], get_task("sst2"), DataSpec(), cfg, progress=False)
        streamed.save_pretrained(root / f"k{k}")
        copy_tokenizer(lm_dirs["mixtral"], root / f"k{k}")
        out[k] = root / f"k{k}"
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_the_lazily_written_graph_generates_as_pytorch_does(k, pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgeprune.export.lm_large import parity_lazy
    from edgeprune.runtime.decoder import EdgeLM

    manifest = write_decoder(None, pruned[k], tmp_path, exporter="lazy")
    assert manifest["exporter"].startswith("torch.onnx.dynamo (weights read lazily)")
    assert (tmp_path / "onnx" / "model.onnx.data").is_file()
    model = AutoModelForCausalLM.from_pretrained(pruned[k]).eval()
    lm = EdgeLM(tmp_path)
    for prompt in PROMPTS:
        ids = lm.prompt_ids(prompt, 8)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 eos_token_id=2)[0, len(ids):].tolist()
            z = model(torch.tensor([ids])).logits[0].numpy()
        got = list(lm.generate_ids(ids, 8))
        assert got == ref[: len(got)] and got
        assert np.abs(lm.logits(ids) - z).max() < 1e-4
    info = parity_lazy(pruned[k], tmp_path, PROMPTS, 6, 1e-4)
    assert info["greedy_equal"] and info["max_abs_logit_diff"] < 1e-4
    assert info["tokens"] == [list(lm.tokens(p, 6)) for p in PROMPTS]  # the fp32 graph's own greedy tokens
    with pytest.raises(ExportError, match="parity: ONNX Runtime's greedy continuation"):
        parity_lazy(pruned[3 - k], tmp_path, PROMPTS, 2, 1e-4)  # against another model: the gate fails


def test_the_lazy_int4_variant_is_the_in_memory_quantizers_graph(pruned, tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgeprune.export.lm_export import weight_variant
    from edgeprune.export.lm_large import quantize_lazy

    write_decoder(None, pruned[2], tmp_path, exporter="lazy")
    info = quantize_lazy(tmp_path, "int4", "model_lazy_q4.onnx", block=32)
    assert info["bits"] == 4
    from edgeprune.export.lm_export import greedy_agreement
    from edgeprune.export.lm_large import parity_lazy, variant_agreement

    parity = parity_lazy(pruned[2], tmp_path, PROMPTS, 4, 1e-4)
    assert variant_agreement(tmp_path, "onnx/model_lazy_q4.onnx", PROMPTS, parity) == \
        greedy_agreement(tmp_path, "onnx/model_lazy_q4.onnx", PROMPTS, 4)
    weight_variant(tmp_path, "int4", PROMPTS, 4, block=32)  # the in-memory quantizer, from the same fp32 graph
    lazy = onnx.load(str(tmp_path / "onnx" / "model_lazy_q4.onnx"))  # its weights in model_lazy_q4.onnx.data
    mem = onnx.load(str(tmp_path / FILES["int4"]))
    assert (tmp_path / "onnx" / "model_lazy_q4.onnx.data").is_file()
    assert {o.domain: o.version for o in lazy.opset_import} == {o.domain: o.version for o in mem.opset_import}
    assert sorted(n.op_type for n in lazy.graph.node) == sorted(n.op_type for n in mem.graph.node)
    assert sum(n.op_type == "MatMulNBits" for n in lazy.graph.node) > 0
    a = {t.name: numpy_helper.to_array(t) for t in lazy.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in mem.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
