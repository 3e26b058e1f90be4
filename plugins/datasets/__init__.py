"""Dataset plugins: where training and calibration text comes from (``text``: a .txt/.jsonl/.csv file or a datasets directory)."""
