"""The edge half: target profiles, ONNX export with parity checks, optimisation and quantization."""
