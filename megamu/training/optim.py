"""The optimizer handed to deepspeed.initialize, built on μP's param groups.

megamu builds it (rather than DeepSpeed from its json) so that every group keeps its own `lr`,
`lr_mult`, `weight_decay` and `eps`. Muon is DeepSpeed's MuonWithAuxAdam with megamu deciding
which parameters are hidden matrices from their μP role; DeepSpeed's own rule (ndim ≥ 2 and no
"embed"/"lm_head" in the name) would also orthogonalise megamu's embedding and readout. Each
optimizer's μP learning-rate rule for the hidden matrices lives in `mup.hidden_lr_mult`.
"""
from __future__ import annotations

import torch
from torch import nn

from megamu.config import Config
from megamu.runtime import fused_adamw

MUON_MOMENTUM = 0.95


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    from megamu.model import mup

    t = cfg.train
    groups = mup.param_groups(model, cfg)
    if t.optimizer == "muon":
        return _build_muon(groups, cfg)
    # Fused on CUDA (the parameters are already on the device: the engine moves the model first). The CPU keeps
    # torch's default: its fused AdamW exists but differs from it in the last bit, which would break exact
    # comparisons with older runs.
    kwargs = {"fused": True} if fused_adamw() else {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps,
                             weight_decay=t.weight_decay, **kwargs)


def _build_muon(groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    t = cfg.train
    for group in groups:
        use_muon = group["name"] == "hidden"
        group["use_muon"] = use_muon
        for p in group["params"]:
            p.use_muon = use_muon  # DeepSpeed's ZeRO optimizers read the tag from the parameter
        if use_muon:
            group.setdefault("momentum", MUON_MOMENTUM)
        else:
            group.setdefault("betas", (t.beta1, t.beta2))
            group.setdefault("eps", t.adam_eps)
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={})


def restore_lr_mults(optimizer: torch.optim.Optimizer, reference: list[dict]) -> None:
    """Make sure every group DeepSpeed hands back still carries its μP `lr_mult`.

    Groups are matched by name (ZeRO replaces the tensors, and a wrapper may rename groups as
    "<name>-muon-params"); a group that cannot be matched is an error, not a silent 1.0.
    """
    mults = {g["name"]: g["lr_mult"] for g in reference}
    for group in optimizer.param_groups:
        if "lr_mult" in group:
            continue
        name = str(group.get("name", ""))
        base = name.removesuffix("-muon-params").removesuffix("-adam-params")
        if base not in mults:
            raise RuntimeError(f"optimizer param group {name!r} has no lr_mult and matches no μP group "
                               f"({', '.join(mults)}); the LR schedule would lose μP's ratios")
        group["lr_mult"] = mults[base]
