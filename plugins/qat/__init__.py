"""Quantization-aware training for ftq's int8 numerics: fake-quant layers, sibling groups, the fused CUDA kernel."""
