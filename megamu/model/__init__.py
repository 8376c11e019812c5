"""The μP transformer: `build_model(cfg)`, size/FLOP formulas, and μP rules in `megamu.model.mup`."""
from megamu.model.transformer import Transformer, build_model, flops_per_token, param_counts, parameter_layout

__all__ = ["Transformer", "build_model", "flops_per_token", "param_counts", "parameter_layout"]
