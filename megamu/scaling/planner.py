"""Compute-optimal planning: the params N and tokens D that minimise a law's loss at a FLOP budget C, and a
megamu config that trains that model.

FLOPs: C = 6·N·D, the rule Chinchilla-form laws were fitted with, N counted as the law counts it (every
parameter for Hoffmann et al.; matched to megamu's total count, embeddings included). megamu's own
metrics.jsonl counts flops_per_token·D (6·non-embedding params + attention); the report gives both.

Allocation: L(N, C/(6N)) is minimised over log N numerically (bounded Brent; the Chinchilla form is convex
in log N), so any law the planner is given can be planned; for E + A/N^α + B/D^β it equals the closed form
N_opt = G·(C/6)^(β/(α+β)), G = (αA/(βB))^(1/(α+β)), D_opt = (C/6)/N_opt, which `closed_form_params` gives and
the tests compare against. Constraints: a tokens-per-parameter ratio R (D = R·N, so N = √(C/(6R))) or a
fixed N (D = C/(6N)).

Shape: the width rule (widths.py: the proxy's head dim and grouped-query group) at the width whose total
parameter count is nearest N in log, at the proxy's depth by default (μP transfers hyper-parameters
across width at a fixed depth), a fixed depth, or a depth following width/depth = aspect.

Batch and learning rate: from the user's sweep (best.yaml of megamu-sweep) where it sets them, else from a
published rule named in the output (hp_rules.py); command-line overrides win over both.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import yaml
from scipy import optimize

from megamu.config import Config, ConfigError, fill_vocab_size, load_config, resolve
from megamu.fileio import atomic_write
from megamu.model import flops_per_token, param_counts
from megamu.scaling.hp_rules import RULES, HPInputs
from megamu.scaling.nd_law import NDLaw
from megamu.scaling.sweep import BEST_YAML, overlay_overrides
from megamu.scaling.widths import config_at_width, width_overrides, width_step
from megamu.shipped import resolve_config

FLOPS_RULE = "C = 6·N·D (N: total parameters, embeddings included; D: training tokens)"
# Kaplan et al. 2020 (fig. 5): at a fixed N the loss changes by only a few percent over this range of width/depth.
ASPECT_RANGE = (20.0, 200.0)
OVER_BUDGET = 1.25  # a config whose run would spend more than this times the budget is refused


@dataclass(frozen=True)
class Allocation:
    params: float
    tokens: float
    loss: float
    interval: Optional[list]

    def to_dict(self) -> dict:
        return {"params": self.params, "tokens": self.tokens, "tokens_per_param": self.tokens / self.params,
                "loss": self.loss, "interval": self.interval}


def _positive(name: str, value: Optional[float]) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value}")


def optimal_params(law: NDLaw, flops: float) -> float:
    """argmin over N of L(N, C/(6N)), found numerically over N in [1, C/6]."""
    half = math.log(flops / 6.0)
    result = optimize.minimize_scalar(lambda x: float(law.loss(math.exp(x), math.exp(half - x))),
                                      bounds=(0.0, half), method="bounded", options={"xatol": 1e-10})
    return math.exp(result.x)


def closed_form_params(law: NDLaw, flops: float) -> float:
    """Chinchilla's closed form: N_opt = G·(C/6)^(β/(α+β)), G = (αA/(βB))^(1/(α+β))."""
    s = law.alpha + law.beta
    return (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / s) * (flops / 6.0) ** (law.beta / s)


def allocate(law: NDLaw, flops: float, tokens_per_param: Optional[float] = None,
             params: Optional[float] = None, level: float = 0.9) -> Allocation:
    """The (N, D) on the budget: compute-optimal, or under one constraint (tokens per param, or N fixed)."""
    _positive("the FLOP budget", flops)
    _positive("the tokens-per-parameter ratio", tokens_per_param)
    _positive("the parameter count", params)
    if tokens_per_param is not None and params is not None:
        raise ConfigError("give a tokens-per-parameter ratio or a parameter count, not both: each fixes N")
    if not 0 < level < 1:
        raise ConfigError(f"the interval level must lie between 0 and 1, got {level}")
    if params is not None:
        n = params
    elif tokens_per_param is not None:
        n = math.sqrt(flops / (6.0 * tokens_per_param))
    else:
        n = optimal_params(law, flops)
    d = flops / (6.0 * n)
    return at(law, n, d, level)


def at(law: NDLaw, params: float, tokens: float, level: float) -> Allocation:
    interval = law.interval(params, tokens, level)
    return Allocation(float(params), float(tokens), float(law.loss(params, tokens)),
                      None if interval is None else [float(v) for v in interval[0]])


@dataclass(frozen=True)
class Shape:
    cfg: Config  # the proxy at the chosen width and depth
    overrides: list  # the dotted overrides that take the proxy there
    depth_rule: str


def shape_for_params(proxy: Config, target: float, depth: Optional[int] = None,
                     aspect: Optional[float] = None) -> Shape:
    """The width-rule model whose total parameter count is nearest `target` (in log)."""
    _positive("the depth", depth)
    _positive("the aspect ratio", aspect)
    if depth is not None and aspect is not None:
        raise ConfigError("give a depth or an aspect ratio (width / depth), not both")
    step = width_step(proxy)

    def layers(width: int) -> int:
        if depth is not None:
            return int(depth)
        return max(1, round(width / aspect)) if aspect is not None else proxy.model.n_layers

    def model(width: int, n_layers: int) -> Config:
        cfg = config_at_width(proxy, width)
        cfg.model.n_layers = n_layers
        return cfg

    def gap(width: int, n_layers: int) -> float:
        return abs(math.log(param_counts(model(width, n_layers))["total"] / target))

    def short(k: int) -> bool:
        return param_counts(model(k * step, layers(k * step)))["total"] < target

    hi = 1  # counts grow with width (and with depth under the aspect rule): bracket, then bisect
    while short(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if short(mid) else (lo, mid)
    width = step * min((c for c in (hi - 1, hi) if c >= 1), key=lambda c: gap(c * step, layers(c * step)))
    n_layers = layers(width)
    if aspect is not None:  # a width step moves N coarsely; a depth within a quarter of the rule's refines it
        n_layers = min(range(max(1, round(0.8 * n_layers)), round(1.25 * n_layers) + 1), key=lambda d: gap(width, d))
    rule = (f"depth {depth} (--depth)" if depth is not None else
            f"depth = width / {aspect:g} (--aspect), within ±25% to match N" if aspect is not None else
            f"the proxy's depth {proxy.model.n_layers} (μP transfers hyper-parameters across width at a fixed depth)")
    return Shape(model(width, n_layers), [*width_overrides(proxy, width), f"model.n_layers={n_layers}"], rule)


def sweep_overrides(path: Optional[str]) -> list:
    """The overrides of a sweep's best.yaml (or of the sweep directory holding it)."""
    if path is None:
        return []
    if os.path.isdir(path):
        path = os.path.join(path, BEST_YAML)
    if not os.path.isfile(path):
        raise ConfigError(f"--sweep: {path} not found; give the best.yaml that megamu-sweep wrote, or its directory")
    return overlay_overrides(path)


def load_proxy(config: str, overrides: Sequence[str]) -> tuple:
    """(proxy Config, its path) with model.vocab_size set (from the tokenizer, or an override)."""
    path = resolve_config(config)
    proxy = load_config(path, list(overrides))
    if proxy.model.vocab_size is None:
        tokenizer = proxy.data.tokenizer_model
        if tokenizer is None or not os.path.isfile(tokenizer):
            raise ConfigError(f"{config}: the vocabulary size is needed to count parameters and data.tokenizer_model "
                              f"({tokenizer}) is not there: add model.vocab_size=V (e.g. 32000) or "
                              f"data.tokenizer_model=PATH")
        fill_vocab_size(proxy)
    return proxy, path


def plan(law: NDLaw, flops: float, config: str = "llama_proxy", overrides: Sequence[str] = (),
         tokens_per_param: Optional[float] = None, params: Optional[float] = None,
         depth: Optional[int] = None, aspect: Optional[float] = None, hp_rule: str = "deepseek",
         sweep: Optional[str] = None, level: float = 0.9, out_dir: str = "runs/plan") -> tuple:
    """Plan a run at `flops`; returns (report dict, the target Config, validated)."""
    if hp_rule not in RULES:
        raise ConfigError(f"unknown batch/learning-rate rule {hp_rule!r}; rules: {', '.join(RULES)}")
    optimum = allocate(law, flops, level=level)
    planned = allocate(law, flops, tokens_per_param, params, level)
    swept = sweep_overrides(sweep)
    proxy, path = load_proxy(config, [*swept, *overrides])
    shape = shape_for_params(proxy, planned.params, depth, aspect)

    rule = RULES[hp_rule]
    inputs = _hp_inputs(shape.cfg, planned.tokens)
    seq, micro = shape.cfg.model.seq_len, shape.cfg.train.micro_batch_size
    rule_batch, rule_lr = rule.batch_tokens(inputs), rule.lr(inputs)
    rule_values = [f"train.global_batch_size={max(1, round(rule_batch / seq / micro)) * micro}",
                   f"train.lr={rule_lr!r}"]
    cfg = load_config(path, [f"model.vocab_size={proxy.model.vocab_size}", *shape.overrides, *rule_values,
                             *swept, *overrides])
    batch = cfg.train.global_batch_size
    cfg.train.max_steps = max(1, math.ceil(planned.tokens / (batch * seq)))
    if not _overridden("train.out_dir", overrides):
        cfg.train.out_dir = out_dir
    resolve(copy.deepcopy(cfg), check_files=False)  # the written config must be one megamu-train accepts

    counts = param_counts(cfg)
    tokens = cfg.train.max_steps * batch * seq
    _check_budget(flops, counts["total"], tokens, planned, cfg)
    n_closed = closed_form_params(law, flops)
    trained = at(law, counts["total"], tokens, level)
    report = {
        "law": law.to_dict(),
        "flops_rule": FLOPS_RULE,
        "budget_flops": flops,
        "level": level,
        "constraint": _constraint(tokens_per_param, params),
        "optimum": optimum.to_dict(),
        "closed_form": {"params": n_closed, "tokens": flops / (6.0 * n_closed)},
        "plan": planned.to_dict(),
        "model": {
            "config": path, "width": cfg.model.hidden_size, "depth": cfg.model.n_layers,
            "n_heads": cfg.model.n_heads, "n_kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.model.vocab_size, "params": counts["total"],
            "non_embedding_params": counts["non_embedding"], "requested_params": planned.params,
            "params_ratio": counts["total"] / planned.params, "depth_rule": shape.depth_rule,
            "aspect_ratio": cfg.model.hidden_size / cfg.model.n_layers,
        },
        "training": {
            **trained.to_dict(), "global_batch_size": batch, "micro_batch_size": cfg.train.micro_batch_size,
            "seq_len": seq, "tokens_per_step": batch * seq, "steps": cfg.train.max_steps, "lr": cfg.train.lr,
            "flops_6nd": 6.0 * counts["total"] * tokens, "megamu_flops": float(flops_per_token(cfg)) * tokens,
        },
        "hyper_parameters": {
            "mup": cfg.mup.enabled, "rule": rule.name, "rule_source": rule.source, "rule_batch_tokens": rule_batch,
            "rule_lr": rule_lr,
            "lr_source": _source("train.lr", swept, overrides, sweep, _lr_rule_text(cfg, rule.name)),
            "batch_source": _source("train.global_batch_size", swept, overrides, sweep,
                                    f"{rule.name} rule at the target's D, rounded to a multiple of the micro batch"),
        },
        "notes": _notes(law, cfg, swept),
    }
    return report, cfg


def _hp_inputs(cfg: Config, tokens: float) -> HPInputs:
    """Under μP the learning rate is the base-width model's (μP equals SP there and transfers it across width)."""
    lr_model = config_at_width(cfg, cfg.mup.base_hidden_size) if cfg.mup.enabled else cfg
    return HPInputs(params=param_counts(cfg)["non_embedding"], tokens=tokens, flops_per_token=flops_per_token(cfg),
                    lr_params=param_counts(lr_model)["non_embedding"], lr_flops_per_token=flops_per_token(lr_model))


def _lr_rule_text(cfg: Config, rule: str) -> str:
    if cfg.mup.enabled:
        return (f"{rule} rule at the base-width model (width {cfg.mup.base_hidden_size}, where μP equals SP) and the "
                f"target's D; μP transfers it across width by construction")
    return f"{rule} rule at the target's N and D (standard parametrisation)"


def _overridden(key: str, overrides: Sequence[str]) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def _source(key: str, swept: list, overrides: Sequence[str], sweep: Optional[str], rule_text: str) -> str:
    if _overridden(key, overrides):
        return "command line"
    if _overridden(key, swept):
        return f"sweep {sweep} (tuned on the proxy; μP transfers it across width, its dependence on D is not applied)"
    return rule_text


def _constraint(tokens_per_param: Optional[float], params: Optional[float]) -> str:
    if tokens_per_param is not None:
        return f"tokens per parameter fixed at {tokens_per_param:g}"
    if params is not None:
        return f"parameters fixed at {params:.4g}"
    return "compute-optimal"


def _check_budget(flops: float, params: int, tokens: int, planned: Allocation, cfg: Config) -> None:
    """Refuse a config whose run would spend more than OVER_BUDGET× the budget (by the plan's 6ND rule): the
    budget is too small for the smallest model or the single step this proxy and batch allow."""
    spent = 6.0 * params * tokens
    if spent <= OVER_BUDGET * flops:
        return
    if params > OVER_BUDGET * planned.params:
        why = (f"the smallest model of this proxy's shape has {params:,} params against the planned "
               f"{planned.params:,.0f} (its embeddings alone: {cfg.padded_vocab_size():,} x {cfg.model.hidden_size}); "
               f"raise --flops or plan from a smaller proxy (vocabulary, width)")
    else:
        why = (f"one step of {cfg.train.global_batch_size} x {cfg.model.seq_len} tokens already exceeds the "
               f"{planned.tokens:,.0f} tokens the budget leaves at {planned.params:.3g} params; raise --flops, or "
               f"lower train.global_batch_size or --params")
    raise ConfigError(f"the planned run would spend {spent:.3g} FLOPs, {spent / flops:.1f}x the budget of {flops:.3g}: "
                      f"{why}")


def _notes(law: NDLaw, cfg: Config, swept: list) -> list:
    notes = []
    if law.covariance is None:
        notes.append(f"no interval: {law.no_interval}")
    else:
        notes.append("the interval is the delta method on the law's covariance plus run-to-run noise; it has no "
                     "term for extrapolating beyond the compute of the fitted runs")
    if "fitted here" not in law.source:
        notes.append("the law's loss is on its authors' data and tokenizer: the N, D split transfers, the loss value "
                     "need not match yours")
    aspect = cfg.model.hidden_size / cfg.model.n_layers
    if not ASPECT_RANGE[0] <= aspect <= ASPECT_RANGE[1]:
        notes.append(f"width / depth = {aspect:.0f} lies outside {ASPECT_RANGE[0]:g}-{ASPECT_RANGE[1]:g}, where "
                     f"Kaplan et al. 2020 found the loss nearly insensitive to shape: consider --depth or --aspect "
                     f"(and sweep the proxy at that depth)")
    if swept:
        notes.append("sweep keys applied: " + ", ".join(o.split("=", 1)[0] for o in swept))
    return notes


def write_config(cfg: Config, report: dict, path: str) -> None:
    """The target config as YAML for megamu-train --config, with a header saying where each number came from."""
    hp, model, training = report["hyper_parameters"], report["model"], report["training"]
    header = [
        f"Planned by megamu-plan at C = {report['budget_flops']:.4g} FLOPs ({report['flops_rule']}),",
        f"{report['constraint']}, minimising {report['law']['form']} from {report['law']['source']}.",
        f"Model: the width rule (megamu.scaling.widths) applied to {model['config']} at width {model['width']}, "
        f"{model['depth_rule']};",
        f"{model['params']:,} parameters against {model['requested_params']:.4g} requested.",
        f"train.max_steps: {training['tokens']:.4g} planned tokens / (global batch x seq_len), rounded up.",
        f"train.global_batch_size: {hp['batch_source']}.",
        f"train.lr: {hp['lr_source']}.",
        "Everything else is the proxy config's.",
    ]
    with atomic_write(path) as handle:
        handle.write("".join(f"# {line}\n" for line in header))
        yaml.safe_dump(cfg.to_dict(), handle, sort_keys=False)


def isoflop_curve(law: NDLaw, flops: float, params: np.ndarray) -> np.ndarray:
    """Loss along the IsoFLOP line: each N with D = C/(6N)."""
    return law.loss(params, flops / (6.0 * params))


def _interval_text(interval: Optional[list], level: float) -> str:
    return f"{level * 100:g}% [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "no interval"


def format_plan(report: dict) -> str:
    """The console table of a plan."""
    law, opt, planned = report["law"], report["optimum"], report["plan"]
    model, training, hp = report["model"], report["training"], report["hyper_parameters"]
    level = report["level"]
    lines = [
        f"Law  L = {law['E']:.4g} + {law['A']:.4g}/N^{law['alpha']:.4g} + {law['B']:.4g}/D^{law['beta']:.4g}",
        f"  source: {law['source']}",
        f"Budget  C = {report['budget_flops']:.4g} FLOPs, {report['flops_rule']}",
        "",
        f"  {'':<22} {'params N':>11} {'tokens D':>11} {'D/N':>7} {'loss':>8}  interval",
        f"  {'compute-optimal':<22} {opt['params']:>11.4g} {opt['tokens']:>11.4g} {opt['tokens_per_param']:>7.2f} "
        f"{opt['loss']:>8.4f}  {_interval_text(opt['interval'], level)}",
    ]
    if report["constraint"] != "compute-optimal":
        lines.append(f"  {'planned (constrained)':<22} {planned['params']:>11.4g} {planned['tokens']:>11.4g} "
                     f"{planned['tokens_per_param']:>7.2f} {planned['loss']:>8.4f}  "
                     f"{_interval_text(planned['interval'], level)}")
        lines.append(f"    constraint: {report['constraint']}")
    lines += [
        f"  {'config as written':<22} {training['params']:>11.4g} {training['tokens']:>11.4g} "
        f"{training['tokens_per_param']:>7.2f} {training['loss']:>8.4f}  {_interval_text(training['interval'], level)}",
        "",
        f"Model  width {model['width']}, depth {model['depth']}, {model['n_heads']} heads of {model['head_dim']} "
        f"({model['n_kv_heads']} kv), vocab {model['vocab_size']}: {model['params']:,} params "
        f"({model['params_ratio'] * 100 - 100:+.1f}% vs planned)",
        f"  depth: {model['depth_rule']}",
        f"Train  {training['steps']:,} steps × {training['global_batch_size']} sequences × "
        f"{training['seq_len']} tokens = {training['tokens']:.4g} tokens; lr {training['lr']:.4g}",
        f"  batch: {hp['batch_source']} (rule: {hp['rule_batch_tokens']:.4g} tokens)",
        f"  lr: {hp['lr_source']} (rule: {hp['rule_lr']:.4g})",
        f"  rule: {hp['rule_source']}",
        f"  FLOPs: 6·N·D = {training['flops_6nd']:.4g}; megamu's metrics.jsonl will count "
        f"{training['megamu_flops']:.4g} (flops_per_token × D: non-embedding params and attention)",
    ]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
