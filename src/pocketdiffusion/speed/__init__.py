"""Speed policy: how the model call is executed (CUDA graphs), separate from what it computes."""
from .cuda_graphs import GraphedModel

__all__ = ["GraphedModel"]
