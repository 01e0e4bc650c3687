"""Frozen teacher models loaded from the checkpoint formats people download."""
