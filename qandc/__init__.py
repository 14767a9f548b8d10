"""qandc: post-training quantization plus feature caching for Diffusion Transformers (the Q&C method)."""

__version__ = "0.1.0"
