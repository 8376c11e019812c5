"""Parallelism: process groups and DeepSpeed's mpu (state.py), Megatron-style tensor/sequence-parallel
layers (layers.py), their autograd mappings (mappings.py), vocab-parallel cross entropy
(cross_entropy.py) and the TP dropout RNG tracker (random.py)."""
from megamu.parallel.state import (ParallelLayout, ParallelState, any_rank, get_parallel_state, initialize_parallel,
                                   is_initialized)

__all__ = ["ParallelLayout", "ParallelState", "any_rank", "get_parallel_state", "initialize_parallel",
           "is_initialized"]
