"""Parallelism: process groups and DeepSpeed's mpu (state.py), Megatron-style tensor/sequence-parallel
layers (layers.py), their autograd mappings (mappings.py), vocab-parallel cross entropy
(cross_entropy.py), the TP dropout RNG tracker (random.py) and TP shard merging (checkpoint_merge.py)."""
from megamu.parallel.state import (ParallelLayout, ParallelState, default_backend, get_parallel_state,
                                   initialize_parallel, is_initialized)

__all__ = ["ParallelLayout", "ParallelState", "default_backend", "get_parallel_state", "initialize_parallel",
           "is_initialized"]
