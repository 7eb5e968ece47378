"""Training utilities: learning-rate schedule and atomic checkpointing."""
