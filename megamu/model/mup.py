"""μP (Maximal Update Parametrization): the only module that knows it.

m = hidden_size / mup.base_hidden_size. Every parameter has a `Role`, assigned by the model module that
owns it once it has built its (parallel) layers (`assign_role`); the parallel layers know nothing of μP.

| role                    | init std                       | AdamW LR | Muon LR | weight decay            |
| embedding, position     | σ                              | η        | (AdamW) | 0 (wd_on_embeddings)    |
| hidden_in, query        | σ/√m  (query 0 if zero_query)  | η/m      | η       | wd / lr_mult (lr·wd fixed) |
| hidden_out (attn o, MLP | σ/√m/√(2·n_layers)             | η/m      | η       | wd / lr_mult            |
|   down)                 |                                |          |         |                         |
| readout                 | 0 if zero_readout else σ       | η        | (AdamW) | 0 (wd_on_embeddings)    |
| norm / bias             | 1 / 0                          | η        | (AdamW) | 0                       |

Encoder (model.arch=bert) roles are these same ones: learned positions are `position` (width-sized rows of a
fixed-size table, like the embedding); the masked-LM head's transform (width × width dense before its norm)
is `hidden_in` (both dimensions grow with width, so its Adam update must shrink as η/m like any block
matrix; not `hidden_out`, as it adds nothing to the residual stream); its norm gain and biases are
`norm`/`bias`; the decoder (vocabulary projection) is `readout`, with logits × α_out/m. Bidirectional
attention changes no scale: scores still take α_attn/d_head.

Encoder-decoder (model.arch=t5) roles are these same ones too: cross-attention's q is `query`, k and v
`hidden_in`, o `hidden_out` (width × width matrices like self-attention's, with the same α_attn/d_head, since
queries and keys from two sequences still become correlated in training); the relative-position tables
(buckets × heads, no width dimension, entering the scores directly) are `position`; the embedding shared by
encoder and decoder is `embedding`.

Hidden learning rate per optimizer (`hidden_lr_mult`). μP asks that a hidden matrix's update change its
output coordinates by Θ(1) whatever the width; equivalently (the spectral view) that ‖ΔW‖₂ scale like
√(fan_out/fan_in). Adam's update is elementwise ±η-sized, so its spectral norm grows like the width n and
the LR must shrink as η/m. Muon's update is already orthogonalised (every singular value ≈ 1) and
DeepSpeed scales it by √max(1, rows/cols), i.e. √(fan_out/fan_in) for the expanding MLP matrices and 1
for the square ones: its spectral norm is already the one μP wants at every width, so its hidden LR must
stay η. Giving Muon Adam's η/m makes its updates vanish as 1/m and tuned LRs stop transferring; a
coordinate check through the real engine shows both (tests/test_muon.py). Embedding, readout, norms and
biases take AdamW steps under Muon too, with AdamW's rules.

Forward multipliers: embedding output × α_in, logits × α_out/m, attention scores × α_attn/d_head with
α_attn = sqrt(base d_head) by default, so at m = 1 the scale is 1/sqrt(d_head).

SP (mup.enabled=false) is "μP evaluated at m = 1 whatever the width": the same init rules with m = 1,
attention 1/sqrt(d_head), logits × 1, embedding × 1, every LR η and wd unscaled. Hence at the base width
the μP and SP models are bit-identical and take identical steps (a test checks it).

LR contract for optimizers and schedules: each param group carries `lr_mult`, and its `lr` must always be
`base_lr_at_step * group["lr_mult"]` (initially `cfg.train.lr * lr_mult`); never overwrite `lr` with the
base LR, or μP's η/m for hidden matrices is lost.

Initialisation is TP- and pipeline-invariant: every parameter's FULL tensor is drawn from a generator
seeded by (train.seed, the parameter's qualified name), and the layer cuts its local shard out of it. It is
ZeRO 3-invariant too: a parameter already partitioned by `deepspeed.zero.Init` is gathered alone, set, and
re-partitioned, so the partitions hold the unpartitioned model's weights.
"""
from __future__ import annotations

import contextlib
import enum
import hashlib
import math
from typing import ContextManager, Optional

import torch
from torch import nn

from megamu.config import Config


class Role(str, enum.Enum):
    """What μP does with a parameter. A str enum: a role compares equal to its name ("hidden_in", ...)."""

    EMBEDDING = "embedding"
    POSITION = "position"
    HIDDEN_IN = "hidden_in"
    QUERY = "query"
    HIDDEN_OUT = "hidden_out"
    READOUT = "readout"
    NORM = "norm"
    BIAS = "bias"

    def __str__(self) -> str:
        return self.value


ROLES = tuple(Role)
HIDDEN_ROLES = (Role.HIDDEN_IN, Role.QUERY, Role.HIDDEN_OUT)
# Optimizer groups: name → the roles it holds.
GROUP_ROLES = {
    "hidden": HIDDEN_ROLES,
    "embedding": (Role.EMBEDDING, Role.POSITION),
    "readout": (Role.READOUT,),
    "norm_bias": (Role.NORM, Role.BIAS),
}


def assign_role(param: Optional[nn.Parameter], role: Role) -> None:
    """Record `param`'s μP role (a missing optional parameter, e.g. an absent bias, is skipped)."""
    if param is not None:
        param.mup_role = role


def assign_linear_roles(linear: nn.Module, weight_role: Role) -> None:
    """A linear layer's weight gets `weight_role`, its bias (if any) the bias role."""
    assign_role(linear.weight, weight_role)
    assign_role(getattr(linear, "bias", None), Role.BIAS)


def role_of(param: nn.Parameter, name: str) -> Role:
    """`param`'s role; ValueError naming the parameter when the model never assigned one."""
    role = getattr(param, "mup_role", None)
    if not isinstance(role, Role):
        raise ValueError(f"parameter {name!r} has μP role {role!r}; the model module owning it must call "
                         f"mup.assign_role with one of {', '.join(r.value for r in Role)}")
    return role


def width_mult(cfg: Config) -> float:
    """μP's m; 1 under SP (SP is μP's formulas evaluated at the base width)."""
    return cfg.width_mult if cfg.mup.enabled else 1.0


def input_multiplier(cfg: Config) -> float:
    """α_in, applied to the embedding output."""
    return cfg.mup.input_mult if cfg.mup.enabled else 1.0


def output_multiplier(cfg: Config) -> float:
    """α_out / m, applied to the logits by the readout layer."""
    return cfg.mup.output_mult / cfg.width_mult if cfg.mup.enabled else 1.0


def attention_scale(cfg: Config) -> float:
    """α_attn / d_head under μP (1/sqrt(d_head) under SP).

    The default α_attn = sqrt(base d_head), base d_head = base_hidden_size / n_heads (heads are kept fixed as
    the width grows), so the μP scale equals SP's 1/sqrt(d_head) at m = 1. A model widened at a fixed head
    dim (more heads) must pin mup.attn_mult to the proxy's value instead; megamu.scaling.widths does.
    """
    head_dim = cfg.head_dim
    if not cfg.mup.enabled:
        return 1.0 / math.sqrt(head_dim)
    alpha = cfg.mup.attn_mult
    if alpha is None:
        alpha = math.sqrt(cfg.mup.base_hidden_size / cfg.model.n_heads)
    return alpha / head_dim


def init_std(role: Role, cfg: Config) -> float:
    """Standard deviation of the normal init for a matrix of this role (norms and biases are constants)."""
    sigma, m = cfg.mup.init_std, width_mult(cfg)
    if role in (Role.EMBEDDING, Role.POSITION):
        return sigma
    if role is Role.QUERY:
        return 0.0 if cfg.mup.zero_query else sigma / math.sqrt(m)
    if role is Role.HIDDEN_IN:
        return sigma / math.sqrt(m)
    if role is Role.HIDDEN_OUT:
        return sigma / math.sqrt(m) / math.sqrt(2 * cfg.model.n_layers)
    if role is Role.READOUT:
        return 0.0 if cfg.mup.zero_readout else sigma
    raise ValueError(f"init_std: role {role!r} is not a matrix role")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def whole_parameter(param: nn.Parameter) -> ContextManager:
    """A context in which `param` holds its whole (TP-local) tensor and in-place writes to it stick.

    A parameter built under ZeRO 3's `deepspeed.zero.Init` keeps only this rank's 1/DP slice: it is gathered
    alone (one full parameter at a time) and re-partitioned from DP rank 0's values on exit, which equal every
    other rank's since the draw depends on the name only."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    from deepspeed.runtime.zero import GatheredParameters

    return GatheredParameters([param], modifier_rank=0)


@torch.no_grad()
def init_parameter(param: nn.Parameter, module: nn.Module, name: str, cfg: Config) -> None:
    """Initialise one parameter from its role; `name` (its qualified name) seeds the generator."""
    role = role_of(param, name)
    with whole_parameter(param):
        if role in (Role.NORM, Role.BIAS):
            param.fill_(1.0 if role is Role.NORM else 0.0)
            return
        std = init_std(role, cfg)
        if std == 0:
            param.zero_()
            return
        full_shape = module.full_shape(param) if hasattr(module, "full_shape") else param.shape
        # fp32 on the CPU whatever the parameter's dtype and device: a bf16 model then holds exactly the fp32
        # model's weights rounded. torch.normal is not one of the constructors zero.Init redirects to the
        # training dtype and device (torch.zeros/empty/... are).
        full = torch.normal(0.0, std, full_shape, generator=_generator(cfg.train.seed, name),
                            dtype=torch.float32, device="cpu")
        local = module.local_shard(full, param) if hasattr(module, "local_shard") else full
        param.copy_(local)


def init_weights(model: nn.Module, cfg: Config, prefix: str = "") -> None:
    """Initialise every parameter of `model` by μP's (or SP's) rule for its role, seeded by cfg.train.seed.

    `prefix`: `model`'s qualified name inside the whole Transformer (e.g. "layers.3" for a pipeline stage's
    block), so that a parameter's draw depends on its logical name, never on how the model is split.
    """
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            qualified = ".".join(part for part in (prefix, module_name, param_name) if part)
            init_parameter(param, module, qualified, cfg)


def hidden_lr_mult(cfg: Config) -> float:
    """The hidden matrices' LR multiplier for cfg.train.optimizer (module docstring): AdamW 1/m, Muon 1."""
    if cfg.train.optimizer == "muon":
        return 1.0
    return 1.0 / width_mult(cfg)


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Param groups: hidden (LR η·hidden_lr_mult, wd/hidden_lr_mult so lr·wd is width-independent, AdamW's
    ε optionally /m), embedding, readout, norm_bias (LR η).

    Each group has `params`, `name`, `lr_mult`, `lr` (= cfg.train.lr · lr_mult), `weight_decay`, and `eps`
    when mup.scale_eps is on. Groups with no parameters (e.g. on a pipeline stage without the embedding)
    are left out. Raises ValueError if any parameter lacks a μP role.
    """
    m = width_mult(cfg)
    wd = cfg.train.weight_decay
    wd_outer = wd if cfg.mup.wd_on_embeddings else 0.0
    hidden_mult = hidden_lr_mult(cfg)
    settings = {
        "hidden": {"lr_mult": hidden_mult, "weight_decay": wd / hidden_mult},
        "embedding": {"lr_mult": 1.0, "weight_decay": wd_outer},
        "readout": {"lr_mult": 1.0, "weight_decay": wd_outer},
        "norm_bias": {"lr_mult": 1.0, "weight_decay": 0.0},
    }
    if cfg.mup.enabled and cfg.mup.scale_eps and cfg.train.optimizer == "adamw":
        settings["hidden"]["eps"] = cfg.train.adam_eps / m
    group_of_role = {role: group for group, roles in GROUP_ROLES.items() for role in roles}
    members: dict[str, list[nn.Parameter]] = {group: [] for group in GROUP_ROLES}
    for name, param in model.named_parameters():
        members[group_of_role[role_of(param, name)]].append(param)
    groups = []
    for group, params in members.items():
        if params:
            s = settings[group]
            groups.append({"params": params, "name": group, "lr": cfg.train.lr * s["lr_mult"], **s})
    return groups


def parameters_by_role(model: nn.Module) -> dict[str, list[str]]:
    """Qualified parameter names per μP role (for inspection and tests)."""
    out: dict[str, list[str]] = {role.value: [] for role in Role}
    for name, param in model.named_parameters():
        out[role_of(param, name).value].append(name)
    return out
