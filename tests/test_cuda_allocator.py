"""memory/cuda_allocator.py: expandable segments, set once, never over the user's own settings, and
without the deprecation warning torch >= 2.9 gives for the torch.cuda spelling."""
from __future__ import annotations

import warnings

from pocketdiffusion.memory import cuda_allocator


def test_the_users_allocator_settings_are_left_alone(monkeypatch):
    monkeypatch.setattr(cuda_allocator, "_done", False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    calls = []
    monkeypatch.setattr(cuda_allocator.torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert cuda_allocator.use_expandable_segments() is False and calls == []


def test_expandable_segments_are_set_once_without_a_warning(monkeypatch):
    monkeypatch.setattr(cuda_allocator, "_done", False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    calls = []
    monkeypatch.setattr(cuda_allocator.torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated torch.cuda spelling warns on every load
        assert cuda_allocator.use_expandable_segments() is True
        assert cuda_allocator.use_expandable_segments() is True
    assert calls == ["expandable_segments:True"]
