"""The CUDA caching allocator's settings for a small peak.

By default the allocator carves blocks out of fixed segments (2 MiB for small, 20 MiB or the
request's size for large tensors) and keeps every segment once reserved, so a step that frees a
60 MiB activation and then asks for a 40 MiB and a 30 MiB one reserves another segment: the
reserved peak runs hundreds of MiB above what is live (diffusers' SD1.5 default: 3272 MiB reserved
for 2700 allocated, ../shared/ANCHORS.md). With expandable segments the allocator maps more
physical pages into one growing virtual range instead, and reserved stays close to allocated.

The setting is process-wide, so we only set it when the user hasn't: PYTORCH_CUDA_ALLOC_CONF,
when present, is theirs and is left alone.
"""
from __future__ import annotations

import os

import torch

_done = False


def use_expandable_segments() -> bool:
    """Turn expandable segments on for this process unless PYTORCH_CUDA_ALLOC_CONF says otherwise.
    Returns whether they are on by our doing."""
    global _done
    if _done:
        return True
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    # torch >= 2.9 deprecates the torch.cuda spelling (a FutureWarning on every load) for this one
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
        getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if set_settings is None:
        return False
    try:
        set_settings("expandable_segments:True")
    except RuntimeError:  # a platform without them: the default stays
        return False
    _done = True
    return True
