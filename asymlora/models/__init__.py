"""Models: random-weight tiny models for tests, smol-llava from package-shipped weights, and real
LLaVA-1.5 checkpoints from a local folder, all through ``load_model``."""

from .tiny import build_tiny_llama, build_tiny_llava

__all__ = ["build_tiny_llama", "build_tiny_llava"]
