"""The fast generation engine: continuous batching, shared prefills, exact prefiltered top-p, multi-model decoding.

`EngineBackend` is the "engine" backend of `closedloop.backends.make_backend` (see backend.py).
"""

from closedloop.engine.backend import Combine, EngineBackend
from closedloop.engine.sampling import sample_next

__all__ = ["Combine", "EngineBackend", "sample_next"]
