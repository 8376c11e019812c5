"""Coordinate check: does every activation's size stay width-independent during training?

For each width, build the model (μP or SP), take a few AdamW steps with `mup.param_groups` on the same
batches, and record mean |activation| per module per step through forward hooks: step 0 is the forward
pass at init, step s the forward pass after s updates. Under μP every curve of log mean|act| against
log width is flat; under SP the logits (and, with larger LRs, the hidden activations) grow with width.

The config is the proxy and every width is derived from it by μScaling's width rule
(megamu.scaling.widths: head dim and grouped-query group fixed, more heads, μP's α_attn pinned to the
proxy's), so the check validates the models the ladder trains; widths must be multiples of head dim ×
group size.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from megamu.config import Config, ConfigError, text_vocab_size
from megamu.data.objectives import inputs_and_labels, objective_batch
from megamu.model import build_model, mup
from megamu.model.layers import Block, DecoderBlock, EmbeddingLayer
from megamu.parallel.layers import ParallelReadout
from megamu.scaling.widths import config_at_width


def token_batches(cfg: Config, n_batches: int, batch_size: int, data_prefix: Optional[str] = None,
                  seed: int = 0) -> list[torch.Tensor]:
    """`n_batches` LongTensors [batch_size, seq_len + 1]: consecutive windows of the tokenized documents at
    `data_prefix` (a .bin/.idx prefix), or deterministic uniform random tokens when it is None; for bert
    masked-LM batches [batch_size, 2, seq_len] of those windows (megamu.data.masking), for t5 span-corruption
    batches [batch_size, 3, seq_len] (megamu.data.span_corruption); random tokens avoid t5's sentinel ids."""
    window = cfg.model.seq_len + 1
    needed = n_batches * batch_size * window
    if data_prefix is None:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, text_vocab_size(cfg), (needed,), generator=generator)
    else:
        from megamu.data.indexed import IndexedDataset

        pieces, total = [], 0
        with IndexedDataset(data_prefix) as dataset:
            for i in range(len(dataset)):
                pieces.append(np.asarray(dataset[i], dtype=np.int64))
                total += len(pieces[-1])
                if total >= needed:
                    break
        if total < needed:
            raise ConfigError(f"{data_prefix}: has {total} tokens, the coordinate check needs {needed} "
                              f"({n_batches} batches × {batch_size} × (seq_len+1)); lower model.seq_len or "
                              f"train.micro_batch_size, or use more data")
        tokens = torch.from_numpy(np.concatenate(pieces)[:needed])
        if int(tokens.max()) >= cfg.model.vocab_size:
            raise ConfigError(f"{data_prefix}: token id {int(tokens.max())} ≥ model.vocab_size "
                              f"{cfg.model.vocab_size}; use the tokenizer the data was made with")
    return [objective_batch(cfg, batch, seed, i * batch_size)
            for i, batch in enumerate(tokens.view(n_batches, batch_size, window))]


def width_config(cfg: Config, width: int, mup_enabled: bool) -> Config:
    """The proxy `cfg` with μP on or off, taken to `width` by the width rule."""
    proxy = copy.deepcopy(cfg)
    proxy.mup.enabled = mup_enabled  # before the rule: it pins α_attn only under μP
    return config_at_width(proxy, width)


def watched_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → module whose output the check records, for every block plus embedding and logits."""
    watched: dict[str, nn.Module] = {}
    block_index = 0
    for layer in model.layers:
        if isinstance(layer, EmbeddingLayer):
            watched["embedding"] = layer
        elif isinstance(layer, Block):
            watched[f"block{block_index}.attn"] = layer.attn
            watched[f"block{block_index}.mlp"] = layer.mlp
            if isinstance(layer, DecoderBlock):
                watched[f"block{block_index}.cross"] = layer.cross_attn
            watched[f"block{block_index}.residual"] = layer
            block_index += 1
        elif isinstance(layer, ParallelReadout):
            watched["logits"] = layer
    return watched


def _width_records(cfg: Config, batches: Sequence[torch.Tensor], steps: int) -> list[dict]:
    torch.manual_seed(cfg.train.seed)
    # The logits are watched: the fused readout-and-loss never produces them.
    cfg = copy.deepcopy(cfg)
    cfg.train.fused_cross_entropy = False
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(mup.param_groups(model, cfg), betas=(cfg.train.beta1, cfg.train.beta2),
                                  eps=cfg.train.adam_eps)
    vocab, step_now, records = cfg.model.vocab_size, 0, []

    def hook(name: str):
        def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            value = output[..., :vocab] if name == "logits" else output  # padded logits carry no signal
            records.append({"width": cfg.model.hidden_size, "step": step_now, "module": name,
                            "mean_abs": value.detach().abs().mean().item()})
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in watched_modules(model).items()]
    try:
        for step_now in range(steps + 1):
            batch = batches[step_now % len(batches)]
            inputs, labels = inputs_and_labels(batch)
            loss = model(inputs, labels=labels)
            if step_now < steps:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return records


def run_coord_check(cfg: Config, widths: Sequence[int], steps: int, batches: Sequence[torch.Tensor],
                    mup_enabled: bool = True, seeds: int = 1) -> dict:
    """Train `steps` AdamW steps at every width on `batches`; returns the DESIGN.md coordinate-check JSON:
    {"parametrization", "widths", "records": [{"width", "step", "module", "mean_abs"}]}.

    With `seeds` > 1, mean_abs is averaged over that many inits (train.seed, train.seed + 1, ...): a single
    init's first Adam steps are noisy enough to bend the curves at small widths.
    """
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size is unset: set it or data.tokenizer_model")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not widths:
        raise ConfigError("no widths to check: pass --widths, e.g. 64,128,256")
    totals: dict[tuple[int, int, str], float] = {}
    for width in widths:
        for offset in range(seeds):
            width_cfg = width_config(cfg, width, mup_enabled)
            width_cfg.train.seed = cfg.train.seed + offset
            for r in _width_records(width_cfg, batches, steps):
                key = (r["width"], r["step"], r["module"])
                totals[key] = totals.get(key, 0.0) + r["mean_abs"] / seeds
    records = [{"width": w, "step": s, "module": m, "mean_abs": v} for (w, s, m), v in totals.items()]
    return {"parametrization": "mup" if mup_enabled else "sp", "widths": list(widths), "records": records}


def slopes(result: dict, step: int) -> dict[str, float]:
    """Per module, the least-squares slope of log(mean |act|) against log(width) at `step`."""
    by_module: dict[str, list[tuple[float, float]]] = {}
    for r in result["records"]:
        if r["step"] == step:
            by_module.setdefault(r["module"], []).append((math.log(r["width"]), math.log(max(r["mean_abs"], 1e-30))))
    if not by_module:
        raise ValueError(f"no records at step {step}")
    return {module: float(np.polyfit(*zip(*points), 1)[0]) for module, points in by_module.items()}


def plot(result: dict, path: str) -> None:
    """Log-log PNG: one panel per step, mean |act| against width, one line per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["step"] for r in result["records"]})
    modules = list(dict.fromkeys(r["module"] for r in result["records"]))
    fig, axes = plt.subplots(1, len(steps), figsize=(3.6 * len(steps) + 2, 3.6), sharey=True, squeeze=False)
    colors = plt.get_cmap("tab20")
    for ax, step in zip(axes[0], steps):
        for i, module in enumerate(modules):
            points = sorted((r["width"], r["mean_abs"]) for r in result["records"]
                            if r["step"] == step and r["module"] == module)
            ax.plot(*zip(*points), marker="o", color=colors(i % 20), label=module)
        ax.set(xscale="log", yscale="log", title=f"step {step}", xlabel="width")
        ax.set_xticks(result["widths"], [str(w) for w in result["widths"]])
        ax.minorticks_off()
    axes[0][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"coordinate check ({result['parametrization']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
