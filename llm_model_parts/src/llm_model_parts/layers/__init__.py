"""Shared building blocks: norms, rotary embeddings, attention, MLPs, the pre-norm decoder block."""
