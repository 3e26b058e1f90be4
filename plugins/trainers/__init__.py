"""Trainer plugins and what only they use: ``causal-lm`` (the fine-tuning loop, DDP) and its resumable checkpoints."""
