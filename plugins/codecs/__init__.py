"""Module codec plugins: how each quantized module type is written to and rebuilt from an artifact (tensors + JSON)."""
