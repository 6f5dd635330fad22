"""closedloop: LLM post-training experiments as reproducible search -> verify -> feedback loops."""

__version__ = "0.1.0"
