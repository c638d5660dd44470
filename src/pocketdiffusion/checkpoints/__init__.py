"""Everything format-specific: reading weights files, telling the architecture from tensor
shapes, and mapping keys onto our models (`load(path) -> Components`)."""
from .detect import detect
from .load import Components, load

__all__ = ["load", "Components", "detect"]
