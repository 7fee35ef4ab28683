"""The generation path (issue 14): a causal-LM MoE pruned for a task into a small language model that generates.

One module per stage, as for classifiers:

* :mod:`~edgeprune.generation.data`: prompts with completions (JSONL ``prompt`` / ``completion``, chat
  ``messages`` rendered with the checkpoint's chat template, or a shipped task cast as an instruction with the
  label word as the completion), tokenised with the completion's span marked;
* :mod:`~edgeprune.generation.distill`: recovery by distillation of the original's next-token distribution
  (KL on the completion tokens);
* :mod:`edgeprune.export.lm_export`: the ONNX export with a KV cache, parity-gated, and its int4 / int8 weights;
* :mod:`edgeprune.validate_lm`: the artifact against the original, side by side;
* :mod:`~edgeprune.generation.build`: ``edgeprune build --generate``, the whole of it with budgets.
"""
