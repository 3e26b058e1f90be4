"""Adapters: small trainable layers trained over a frozen, quantized model."""
