"""Interop with PyTorch serving stacks: PEFT adapters (SHiRA for Sylva tiles, LoRA) and
merged Hugging Face checkpoints. The public entry point is :mod:`sylva_jax.export`."""
