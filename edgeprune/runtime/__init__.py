"""What an app uses, without torch: ``from edgeprune.runtime import EdgeModel, EdgeLM`` (onnxruntime, tokenizers
and numpy only), the artifact manifest's schema (:mod:`.manifest`) and the demo server (:mod:`.serve`)."""
from edgeprune.runtime.classifier import EdgeModel
from edgeprune.runtime.decoder import EdgeLM

__all__ = ["EdgeModel", "EdgeLM"]
