"""Coordinate check through the real training engine, for any optimizer megamu trains with.

The plain coordinate check (`coord_check`) steps a bare AdamW; this one builds each width exactly as the
trainer does (μP param groups, `build_optimizer`, DeepSpeed's engine and ZeRO stage, the LR schedule and
the non-finite gate) and records, on one fixed probe batch, what μP constrains directly: for every hidden
matrix W, the coordinates of (W_s − W_0)·x, the change its own updates make to its output (x: its input
now). μP asks that these be Θ(1) whatever the width. A module's whole output change would not do: the
embedding's update (η at every width) moves every later input by Θ(1) and hides the matrices' own share.
An optimizer whose hidden LR follows the wrong width rule shows up as a slope of log mean|ΔW·x| against
log width (Muon given Adam's η/m: −1).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megamu.config import Config, resolve
from megamu.model import mup


def _hidden_linears(module: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → linear layer, for every linear whose weight is a μP hidden matrix."""
    return {name: layer for name, layer in module.named_modules()
            if isinstance(getattr(layer, "weight", None), nn.Parameter)
            and getattr(layer.weight, "mup_role", None) in mup.HIDDEN_ROLES}


def _update_sizes(linears: dict[str, nn.Module], initial: dict[str, torch.Tensor], module: nn.Module,
                  probe: torch.Tensor) -> dict[str, float]:
    """mean |(W − W_0)·x| per hidden linear on `probe`, x being the layer's input in this forward pass."""
    sizes: dict[str, float] = {}
    handles = []
    for name, layer in linears.items():
        def measure(layer: nn.Module, inputs: tuple, _output: torch.Tensor, name: str = name) -> None:
            delta = layer.weight.detach().float() - initial[name]
            sizes[name] = F.linear(inputs[0].detach().float(), delta).abs().mean().item()
        handles.append(layer.register_forward_hook(measure))
    try:
        with torch.no_grad():
            module(probe[:, :-1])
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _width_records(cfg: Config, batches: Sequence[torch.Tensor], probe: torch.Tensor, steps: int) -> list[dict]:
    from megamu.parallel import initialize_parallel
    from megamu.training.ds_config import build_ds_config
    from megamu.training.engine import build_engine

    state = initialize_parallel(timeout_minutes=cfg.parallel.timeout_minutes)
    optimizer_step = build_engine(cfg, build_ds_config(cfg, dp_size=1), state)
    module = optimizer_step.engine.module
    linears = _hidden_linears(module)
    initial = {name: layer.weight.detach().float().clone() for name, layer in linears.items()}
    records = []
    stream = iter(batches)
    for step in range(1, steps + 1):
        outcome = optimizer_step(step - 1, stream)
        if outcome.skipped:
            raise RuntimeError(f"width {cfg.model.hidden_size}: step {step} was skipped (non-finite loss or "
                               f"gradients); lower train.lr for the check")
        for name, size in _update_sizes(linears, initial, module, probe).items():
            records.append({"width": cfg.model.hidden_size, "step": step, "module": name, "mean_abs": size})
    return records


def run_engine_coord_check(width_configs: Sequence[Config], steps: int, batches: Sequence[torch.Tensor],
                           probe: torch.Tensor) -> dict:
    """Train `steps` engine steps at every width (one resolved config each, from the width rule) and return
    {"parametrization", "optimizer", "quantity": "delta_w_x", "widths", "records": [{"width", "step",
    "module", "mean_abs"}]}, module being a hidden linear's qualified name and mean_abs its mean |ΔW·x|.

    `batches` must hold at least steps × gradient-accumulation micro batches [micro_batch, seq_len + 1].
    """
    records = []
    for cfg in width_configs:
        cfg = copy.deepcopy(cfg)
        resolve(cfg, world_size=1, check_files=False)
        torch.manual_seed(cfg.train.seed)
        records += _width_records(cfg, batches, probe, steps)
    first = width_configs[0]
    return {"parametrization": "mup" if first.mup.enabled else "sp", "optimizer": first.train.optimizer,
            "quantity": "delta_w_x", "widths": [c.model.hidden_size for c in width_configs], "records": records}
