"""edgeprune: task-aware pruning of Mixture-of-Experts transformers into small ONNX models for edge targets.

Importing :mod:`edgeprune` alone stays light (no torch): the runtime for apps lives in
:mod:`edgeprune.runtime.classifier` and needs only onnxruntime, tokenizers and numpy.
"""
__version__ = "0.2.0"
