"""Serving slimengine bundles on Triton Inference Server (docs/serving.md).

- repository.py: `slimengine triton-repo`, a standard Triton model repository (config.pbtxt + Python-backend model.py per
  model) for SD3 and LEMUR bundles.
- backend.py: what those model.py files run inside Triton's Python backend (imported there, never here).
- server.py: the tritonserver shipped by the nvidia-pytriton wheel, started on such a repository (`slimengine serve`, the
  tests, the benchmark).
"""

from .repository import ModelSpec, RepositoryOptions, write_repository

__all__ = ["ModelSpec", "RepositoryOptions", "write_repository"]
