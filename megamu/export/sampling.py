"""Text generation from a megamu checkpoint: greedy or temperature/top-p sampling over the KV-cache decoder.

The prompt is megamu's tokenizer's encoding of the text (no BOS: megamu's data has none); generation
stops after the end-of-sequence token, after `max_new_tokens`, or when the context (model.seq_len) is full.
Temperature 0 is greedy (argmax, ties to the lowest id, as torch.argmax and transformers do).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megamu.config import ConfigError
from megamu.export.decode import KVCache, forward_cached
from megamu.model.transformer import Transformer


@dataclasses.dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: sample among the fewest tokens whose probability reaches top_p
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be ≥ 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` [V] with every token outside the nucleus set to -inf (the most likely token always stays)."""
    if top_p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = top_p_filter(logits.float() / sampling.temperature, sampling.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: Transformer, prompt: list[int], sampling: Sampling, eos_id: Optional[int]) -> list[int]:
    """The new token ids after `prompt` (ids), decoded with a KV cache."""
    sampling.check()
    if not prompt:
        raise ConfigError("--prompt encodes to no tokens; give some text")
    if len(prompt) >= model.seq_len:
        raise ConfigError(f"the prompt is {len(prompt)} tokens and model.seq_len is {model.seq_len}: nothing fits "
                          f"after it; shorten the prompt")
    where = next(model.parameters()).device
    generator = torch.Generator(device=where).manual_seed(sampling.seed)
    cache = KVCache()
    logits = forward_cached(model, torch.tensor([prompt], device=where), cache)[0, -1]
    new: list[int] = []
    while True:
        token = next_token(logits, sampling, generator)
        new.append(token)
        if token == eos_id or len(new) == sampling.max_new_tokens or cache.length == model.seq_len:
            return new
        logits = forward_cached(model, torch.tensor([[token]], device=where), cache)[0, -1]
