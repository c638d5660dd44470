"""Training data helpers: the BPE vocabulary builder for the project's own small model."""
from .bpe import train_bpe, write_bpe

__all__ = ["train_bpe", "write_bpe"]
