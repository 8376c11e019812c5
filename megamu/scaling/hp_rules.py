"""Published rules for the batch size and peak learning rate of a run of N parameters on D tokens.

- `deepseek`: DeepSeek-AI 2024, "DeepSeek LLM: Scaling Open-Source Language Models with Longtermism",
  section 3.1: B_opt = 0.2920·C^0.3271 tokens and η_opt = 0.3118·C^−0.1250, with C = M·D and M the
  non-embedding FLOPs per token (attention included). megamu's flops_per_token is the closest count
  (6·N_non_embedding + attention; it also counts the readout, which DeepSeek's M leaves out).
- `steplaw`: Li et al. 2025, "Predictable Scale: Part I — Optimal Hyperparameter Scaling Law in Large
  Language Model Pretraining" (Step Law): η = 1.79·N^−0.713·D^0.307 and B = 0.58·D^0.571 tokens, N the
  non-embedding parameters (megamu's count, readout included).

Both were fitted with AdamW under the standard parametrisation. Under μP megamu's train.lr is the
learning rate of the base-width model (μP equals SP there) and transfers across width by construction,
so the learning-rate rule is evaluated at the base-width model (`HPInputs.lr_*`) and at the target's D;
the batch size is not width-parametrised and is evaluated at the target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class HPInputs:
    """What the rules read: the target's non-embedding params, tokens and FLOPs per token, and the same
    for the model whose learning rate train.lr is (the base-width model under μP, the target under SP)."""

    params: float
    tokens: float
    flops_per_token: float
    lr_params: float
    lr_flops_per_token: float


@dataclass(frozen=True)
class HPRule:
    name: str
    source: str
    batch_tokens: Callable[[HPInputs], float]
    lr: Callable[[HPInputs], float]


RULES = {
    "deepseek": HPRule(
        "deepseek",
        "DeepSeek LLM (DeepSeek-AI 2024), sec. 3.1: B = 0.2920·C^0.3271 tokens, η = 0.3118·C^-0.1250, "
        "C = non-embedding FLOPs per token × D",
        lambda x: 0.2920 * (x.flops_per_token * x.tokens) ** 0.3271,
        lambda x: 0.3118 * (x.lr_flops_per_token * x.tokens) ** -0.1250,
    ),
    "steplaw": HPRule(
        "steplaw",
        "Step Law (Li et al. 2025, Predictable Scale Part I): B = 0.58·D^0.571 tokens, "
        "η = 1.79·N^-0.713·D^0.307, N non-embedding params",
        lambda x: 0.58 * x.tokens**0.571,
        lambda x: 1.79 * x.lr_params**-0.713 * x.tokens**0.307,
    ),
}
