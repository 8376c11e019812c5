"""Export a megamu run to a transformers model directory: weights, config, generation config, tokenizer.

    export_run(run_dir, out_dir, tag=None, dtype="fp32")

The run's weights (any TP/PP/ZeRO layout, source.py) have μP folded in (fold.py) and are renamed for
the target class of their architecture (llama.py, gpt2.py). The transformers model is built from its
config, loaded strictly (every tensor accounted for both ways) and saved with `save_pretrained`
(safetensors). Exported logits equal megamu's (tests/test_export_hf.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from types import ModuleType
from typing import Optional

import torch

from megamu.config import Config, ConfigError
from megamu.data.tokenizer import Tokenizer
from megamu.export import gpt2, llama
from megamu.export.fold import fold_mup
from megamu.export.source import load_run_weights, tokenizer_model as run_tokenizer_model
from megamu.export.tokenizer import export_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Exported:
    out_dir: str
    architecture: str
    tag: str
    dtype: str
    params: int


def require_transformers() -> None:
    """ConfigError saying how to install the export dependencies when they are missing."""
    missing = [name for name in ("transformers", "safetensors") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"Hugging Face export needs {' and '.join(missing)}, which is not installed: "
                          f"pip install 'megamu[export]'")


def family(cfg: Config) -> ModuleType:
    """The module that maps this architecture to transformers; ConfigError for a model no standard class computes."""
    m = cfg.model
    if m.arch == "gpt2" and m.qk_norm:
        raise ConfigError("model.arch=gpt2 with model.qk_norm=true cannot be exported: GPT2LMHeadModel has no "
                          "per-head q/k LayerNorm and no standard transformers class has GPT-2's block with one; "
                          "export a llama-arch QK-norm model (Qwen3ForCausalLM) or a gpt2 model without qk_norm")
    if m.arch == "gpt2":
        return gpt2
    if m.arch == "llama":
        return llama
    raise ConfigError(f"model.arch={m.arch!r} has no Hugging Face export; llama and gpt2 do")


def special_ids(tokenizer: Optional[Tokenizer]) -> dict[str, Optional[int]]:
    """The tokenizer's BOS/EOS/pad ids for the model and generation configs (None: it has none, or no tokenizer;
    SentencePiece says -1 for an id it lacks)."""
    if tokenizer is None:
        return dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {key: (i if i is not None and i >= 0 else None) for key, i in ids.items()}


def hf_model(cfg: Config, state: dict[str, torch.Tensor], tokenizer: Optional[Tokenizer] = None,
             dtype: str = "fp32") -> torch.nn.Module:
    """The transformers model computing what megamu's model with TP=1 `state` computes, in eval mode."""
    import transformers

    target = family(cfg)
    model_class, config_class = target.target_classes(cfg)
    config = getattr(transformers, config_class)(**target.hf_config(cfg, special_ids(tokenizer)))
    config.architectures = [model_class]
    model = getattr(transformers, model_class)(config)
    model.load_state_dict(target.hf_state(cfg, fold_mup(cfg, state)), strict=True)
    return model.to(DTYPES[dtype]).eval()


def export_run(run_dir: str, out_dir: str, tag: Optional[str] = None, dtype: str = "fp32",
               tokenizer_model: Optional[str] = None) -> Exported:
    """Write checkpoint `tag` (default: the newest complete one) of the run in `run_dir` to `out_dir` as a
    transformers model directory with the run's tokenizer (`tokenizer_model`, default data.tokenizer_model)."""
    require_transformers()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg, state, tag = load_run_weights(run_dir, tag)
    family(cfg)  # refuse an unsupported model before anything is written
    tokenizer = export_tokenizer(run_tokenizer_model(cfg, run_dir, tokenizer_model), out_dir, cfg.model.seq_len)
    model = hf_model(cfg, state, tokenizer, dtype)
    model.generation_config.update(**special_ids(tokenizer))
    model.save_pretrained(out_dir)
    return Exported(out_dir, model.config.architectures[0], tag, dtype, sum(p.numel() for p in model.parameters()))
