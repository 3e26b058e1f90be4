"""What quantizers do to a float model before or while converting it: layer selection, calibration, SmoothQuant,
the sensitivity fallback."""
