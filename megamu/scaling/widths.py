"""The width rule: the one way μScaling widens a proxy (ladder rungs, sweeps at several widths, coordinate check).

At width w the model keeps the proxy's head dimension d (n_heads = w / d), its grouped-query group size
g = n_heads / n_kv_heads (n_kv_heads = n_heads / g), and mup.base_hidden_size (so m = w / base width);
an explicit model.ffn_hidden_size scales by w / proxy width (the default 8/3·h or 4·h rule follows by
itself). Under μP a default mup.attn_mult is pinned to the proxy's α_attn = attention_scale · d: the
default assumes a fixed head count, and with a fixed head dim only a fixed α_attn keeps the attention
scale α_attn / d the proxy's at every width. Valid widths are the positive multiples of d · g.
"""
from __future__ import annotations

import copy
from typing import Union

from megamu.config import Config, ConfigError
from megamu.model import mup

Setting = Union[int, float]


def width_step(cfg: Config) -> int:
    """The smallest width increment the rule allows from `cfg`: head dim × grouped-query group size."""
    return cfg.head_dim * (cfg.model.n_heads // cfg.kv_heads)


def width_settings(cfg: Config, width: int) -> dict[str, Setting]:
    """Dotted key → value for every key the rule changes to take the proxy `cfg` to `width`."""
    m = cfg.model
    head_dim = cfg.head_dim
    if width <= 0 or width % head_dim:
        raise ConfigError(f"width {width} is not a positive multiple of the head dimension {head_dim} "
                          f"(model.hidden_size {m.hidden_size} / model.n_heads {m.n_heads}); pick a multiple of it")
    n_heads = width // head_dim
    settings: dict[str, Setting] = {"model.hidden_size": width, "model.n_heads": n_heads}
    if cfg.mup.enabled and cfg.mup.attn_mult is None:
        settings["mup.attn_mult"] = mup.attention_scale(cfg) * head_dim
    if m.n_kv_heads is not None:
        group = m.n_heads // cfg.kv_heads
        if n_heads % group:
            raise ConfigError(f"width {width} gives {n_heads} heads, not a multiple of the grouped-query group size "
                              f"{group} (model.n_heads / model.n_kv_heads); pick a width with a multiple of "
                              f"{width_step(cfg)}")
        settings["model.n_kv_heads"] = n_heads // group
    if m.ffn_hidden_size:
        settings["model.ffn_hidden_size"] = round(m.ffn_hidden_size * width / m.hidden_size)
    return settings


def width_overrides(cfg: Config, width: int) -> list[str]:
    """The rule as command-line overrides (what ladder and sweep runs are launched with); repr keeps floats exact."""
    return [f"{key}={value!r}" for key, value in width_settings(cfg, width).items()]


def config_at_width(cfg: Config, width: int) -> Config:
    """A copy of the proxy `cfg` at `width`: the same config `width_overrides` gives when loaded."""
    out = copy.deepcopy(cfg)
    for dotted, value in width_settings(cfg, width).items():
        section, key = dotted.split(".")
        setattr(getattr(out, section), key, value)
    return out
