"""Real checkpoints: what users already have (Stable Diffusion family files and folders) entering the engine.

This package holds no node definitions of its own yet; the tokenizer here is the first piece.
"""
