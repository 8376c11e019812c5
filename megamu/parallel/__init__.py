"""Parallelism: process groups (state.py); later TP layers, mappings and the RNG tracker."""
from megamu.parallel.state import (ParallelLayout, ParallelState, default_backend, get_parallel_state,
                                   initialize_parallel, is_initialized)

__all__ = ["ParallelLayout", "ParallelState", "default_backend", "get_parallel_state", "initialize_parallel",
           "is_initialized"]
