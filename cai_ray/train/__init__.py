"""Training pieces: losses (pure torch), LoRA, DeepSpeed config, per-worker loops."""
