"""The width rule (megamu.scaling.widths): the shipped target configs are its output from the shipped proxy,
and the config it builds equals the one its overrides give when a run is launched with them."""
from __future__ import annotations

from pathlib import Path

import pytest

from megamu.config import Config, load_config
from megamu.model import mup
from megamu.scaling.widths import config_at_width, width_overrides, width_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROXY = CONFIGS / "llama_proxy.yaml"  # the GPU targets' proxy (mup_proxy.yaml is the CPU demo's)
TARGETS = ["llama_125m.yaml", "llama_1b.yaml"]


def width_rule_keys(cfg: Config) -> dict:
    """Every key the rule decides, and what it is for: the attention scale and the resolved MLP width."""
    return {"model.hidden_size": cfg.model.hidden_size, "model.n_heads": cfg.model.n_heads,
            "model.n_kv_heads": cfg.model.n_kv_heads, "model.ffn_hidden_size": cfg.model.ffn_hidden_size,
            "mlp width": cfg.ffn_hidden_size, "mup.attn_mult": cfg.mup.attn_mult,
            "mup.base_hidden_size": cfg.mup.base_hidden_size, "attention scale": mup.attention_scale(cfg)}


@pytest.mark.parametrize("name", TARGETS)
def test_shipped_target_is_the_width_rule_applied_to_the_proxy(name):
    # Depth, sequence length, data and batch are the target's own: only the width-rule keys are compared.
    target = load_config(str(CONFIGS / name))
    derived = config_at_width(load_config(str(PROXY)), target.model.hidden_size)
    assert width_rule_keys(target) == width_rule_keys(derived)  # exact: the file spells the rule's floats


@pytest.mark.parametrize("name", TARGETS)
def test_the_rule_takes_a_target_back_to_the_proxy_width(name):
    """A sweep at the proxy width on a target config (its depth and data) tunes the proxy's shape at m = 1."""
    proxy = load_config(str(PROXY))
    back = config_at_width(load_config(str(CONFIGS / name)), proxy.model.hidden_size)
    expected = {**width_rule_keys(proxy), "mup.attn_mult": mup.attention_scale(proxy) * proxy.head_dim}
    assert width_rule_keys(back) == expected
    assert mup.attention_scale(back) == pytest.approx(proxy.head_dim ** -0.5)  # μP = SP at the proxy width


def test_the_config_at_a_width_is_the_config_its_overrides_launch():
    proxy_overrides = ["model.hidden_size=96", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_hidden_size=288",
                       "mup.base_hidden_size=96", "model.vocab_size=64"]
    proxy = load_config(None, proxy_overrides)
    assert width_step(proxy) == 48  # head dim 16 × 3 heads per kv head
    for width in (48, 96, 240, 960):
        at_width = config_at_width(proxy, width)
        assert at_width == load_config(None, [*proxy_overrides, *width_overrides(proxy, width)])
        assert (at_width.head_dim, at_width.model.n_heads // at_width.kv_heads) == (16, 3)
        assert at_width.model.ffn_hidden_size == 3 * width
        assert mup.attention_scale(at_width) == pytest.approx(0.25, rel=1e-12)
    assert proxy.mup.attn_mult is None and proxy.model.hidden_size == 96  # the proxy itself is left alone
