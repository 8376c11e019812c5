"""FP8 matmuls for the transformer's hidden linear layers through torchao (`train.fp8`).

Each column/row-parallel linear computes `self.matmul(x, W, b)`; `use_fp8_matmuls` swaps in torchao's FP8
training matmul (its "tensorwise" recipe: dynamic per-tensor scales, e4m3 inputs and weights, e5m2
output gradients) for the linears whose weights μP calls hidden (q, k, v, o, the MLP), so parameters,
their names, μP's roles, init, learning rates and multipliers are unchanged: only the GEMMs change
precision. The embedding and the readout stay in the training dtype, as usual for FP8 training (their
error would land directly on the logits). The FP8 GEMM needs both dimensions of the local weight
divisible by 16: a hidden linear that does not fit is an error, not a silent high-precision layer.

torchao's matmul is an internal of its Float8Linear (its public API swaps `nn.Linear` modules, which
megamu's TP layers are not), so setup.py's `fp8` extra bounds torchao's version.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megamu.errors import ConfigError
from megamu.model.mup import HIDDEN_ROLES
from megamu.parallel.layers import ColumnParallelLinear, LinearFunction, RowParallelLinear

FP8_GEMM_MULTIPLE = 16


def fp8_linear(recipe: str = "tensorwise") -> LinearFunction:
    """y = x Wᵀ (+ b) with the matmul (and its two backward matmuls) in FP8 per torchao's `recipe`."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

    config = Float8LinearConfig.from_recipe_name(recipe)
    with torch.device("meta"):  # only for the GEMM settings torchao derives from the recipe
        gemm_settings = Float8Linear(FP8_GEMM_MULTIPLE, FP8_GEMM_MULTIPLE, bias=False, config=config).linear_mm_config

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = matmul_with_hp_or_float8_args.apply(x, weight.t(), gemm_settings, config)
        return y if bias is None else y + bias.to(y.dtype)

    return linear


def use_fp8_matmuls(model: nn.Module) -> list[str]:
    """Give every hidden linear layer of `model` the FP8 matmul; returns their names. ConfigError when a
    layer's local weight does not fit FP8 GEMMs."""
    hidden = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (ColumnParallelLinear, RowParallelLinear))
              and getattr(module.weight, "mup_role", None) in HIDDEN_ROLES]
    for name, module in hidden:
        if any(size % FP8_GEMM_MULTIPLE for size in module.weight.shape):
            raise ConfigError(f"train.fp8=true: layer {name} has a local weight of shape {tuple(module.weight.shape)}; "
                              f"FP8 GEMMs need both sizes divisible by {FP8_GEMM_MULTIPLE}: choose model.hidden_size, "
                              f"the MLP width and the kv heads × head dim (per TP rank) as multiples of it")
    matmul = fp8_linear()
    for _, module in hidden:
        module.matmul = matmul
    return [name for name, _ in hidden]
