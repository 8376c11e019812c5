"""One typed config for everything: YAML file + dotted command-line overrides, validated up front.

Every error names the offending key and says how to fix it, and is raised before any model,
process group or data is touched.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from megamu.errors import ConfigError
from megamu.fileio import atomic_write
from megamu.shipped import DEEPSPEED, shipped_path


@dataclass
class ModelConfig:
    # "llama" (RMSNorm, SwiGLU, RoPE), "gpt2" (LayerNorm, GELU, learned positions), "bert" (gpt2's block,
    # bidirectional, masked-language-model head and objective) or "t5" (encoder-decoder of llama's blocks with
    # cross-attention, span-corruption objective; n_layers encoder and n_layers decoder blocks)
    arch: str = "llama"
    # bert: "learned" (the default) or "rotary"; t5: "relative" (T5's bucketed bias, the default) or "rotary";
    # gpt2 always learns them, llama always rotates
    positions: Optional[str] = None
    hidden_size: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads
    ffn_hidden_size: Optional[int] = None  # None: llama 8/3·h rounded up to ffn_multiple_of, gpt2 4·h
    ffn_multiple_of: int = 64
    seq_len: int = 256
    vocab_size: Optional[int] = None  # None = the tokenizer's vocabulary size
    make_vocab_size_divisible_by: int = 128  # padded vocab (× TP): tensor-core-sized matmuls, TP-divisible
    qk_norm: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0


@dataclass
class MupConfig:
    enabled: bool = True
    base_hidden_size: int = 256  # width at which μP equals SP (m = hidden_size / base_hidden_size)
    init_std: float = 0.02  # σ
    input_mult: float = 1.0  # α_in: embedding output multiplier
    output_mult: float = 1.0  # α_out: logits × α_out / m
    attn_mult: Optional[float] = None  # α_attn: scores × α_attn / d_head; None = sqrt(base d_head) (SP at m=1)
    zero_readout: bool = True  # readout initialised to 0 (μP default)
    zero_query: bool = False  # query projection initialised to 0
    scale_eps: bool = False  # Adam ε scaled by 1/m for hidden matrices
    wd_on_embeddings: bool = False  # weight decay on embedding/readout/norms (off by default)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    pipeline_blocks: Optional[list] = None  # transformer blocks per pipeline stage, e.g. [3, 1]; None = even split
    sequence_parallel: bool = False
    timeout_minutes: float = 10.0  # collective timeout for every process group megamu creates
    # a peer silent this long ends every rank, naming it (seconds; 0 = off, the collective timeout still holds)
    heartbeat_timeout_s: float = 60.0


@dataclass
class DataConfig:
    path: Optional[str] = None  # one prefix, e.g. data/sample_text_document
    paths: Optional[list] = None  # [w1, prefix1, w2, prefix2, ...]
    tokenizer_model: Optional[str] = None
    split: str = "969,30,1"
    cache_dir: Optional[str] = None  # where sample indices are cached; None = beside the data
    bytes_per_token: Optional[float] = None  # for bits-per-byte; None = measured from the tokenizer
    # processes preparing batches ahead of the step; None = 1 on CUDA (overlaps the GPU), 0 on CPU (spare no core)
    loader_workers: Optional[int] = None
    # model.arch=bert's masked-language-model samples: this fraction of each sample's tokens is predicted; of
    # those, mlm_mask_fraction are replaced by mask_token_id, mlm_random_fraction by a random token, the rest kept
    mlm_probability: float = 0.15
    mlm_mask_fraction: float = 0.8
    mlm_random_fraction: float = 0.1
    # None = the tokenizer's <pad> id (never in megamu's encoded text), or one id appended above its pieces
    mask_token_id: Optional[int] = None
    mlm_whole_words: bool = False  # predict whole words (pieces joined by the tokenizer's word boundaries)
    # model.arch=t5's span corruption of each sample's model.seq_len tokens: this fraction of them is hidden in
    # spans of this mean length, each span replaced by one sentinel; the sentinels are the top sentinel_tokens
    # ids of model.vocab_size (appended to the tokenizer's pieces when model.vocab_size is filled from it)
    span_noise_density: float = 0.15
    span_mean_length: float = 3.0
    sentinel_tokens: int = 100


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    global_batch_size: int = 8
    max_steps: int = 100
    stop_at_step: int = 0  # >0: stop after this step with a checkpoint (e.g. a job time limit); schedule spans max_steps
    lr: float = 3e-3  # η: base Adam LR (μP scales hidden matrices by 1/m)
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    warmup_steps: int = 10
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
    decay_fraction: float = 0.2  # wsd: fraction of max_steps spent decaying
    optimizer: str = "adamw"  # "adamw" or "muon" (Muon for hidden matrices, AdamW for the rest)
    weight_decay: float = 0.0  # at the base width; μP keeps lr·wd width-independent
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    out_dir: str = "runs/default"
    save_interval: int = 0  # 0 = only at the end
    eval_interval: int = 0  # 0 = only at the end
    eval_iters: int = 4
    resume: bool = False
    # start from this full TP=1 state dict (.pt from megamu-merge or megamu-import-hf) instead of μP's init
    init_from: Optional[str] = None
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping with a checkpoint
    # after SIGTERM: seconds to finish the step and save before exiting without them (0 = no limit); keep it
    # below the scheduler's kill wait (SLURM KillWait, 30 s by default)
    preempt_grace_s: float = 25.0
    deepspeed_config: Optional[str] = None  # ds_configs/zeroN.json; None = ZeRO 1 (ZeRO 0 at DP=1)
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16"
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    # readout + cross entropy fused over chunks of tokens: full-batch fp32 logits are never materialised
    fused_cross_entropy: bool = True
    fp8: bool = False  # FP8 linear layers through torchao (H100/H200 class GPUs only)
    # "none", "selective" (recompute norms, attention core and MLP activation) or "full" (every block) in backward
    activation_checkpointing: str = "none"


@dataclass
class LogConfig:
    interval: int = 10
    wandb_project: Optional[str] = None
    wandb_mode: str = "offline"  # "online", "offline" or "disabled"
    tensorboard: bool = False
    progress_bar: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mup: MupConfig = field(default_factory=MupConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def width_mult(self) -> float:
        """μP's m = hidden_size / base_hidden_size."""
        return self.model.hidden_size / self.mup.base_hidden_size

    @property
    def head_dim(self) -> int:
        return self.model.hidden_size // self.model.n_heads

    @property
    def kv_heads(self) -> int:
        return self.model.n_kv_heads or self.model.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        m = self.model
        if m.ffn_hidden_size:
            return m.ffn_hidden_size
        if not rms_swiglu(m.arch):
            return 4 * m.hidden_size
        raw = int(8 * m.hidden_size / 3)
        return m.ffn_multiple_of * ((raw + m.ffn_multiple_of - 1) // m.ffn_multiple_of)

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on: train.global_batch_size sequences of model.seq_len tokens."""
        return self.train.global_batch_size * self.model.seq_len

    @property
    def rotary(self) -> bool:
        """Whether attention rotates q and k (RoPE) rather than the embedding adding learned positions."""
        return self.model.arch == "llama" or self.model.positions == "rotary"

    @property
    def relative_positions(self) -> bool:
        """Whether attention adds T5's learned relative-position bias (t5 unless model.positions=rotary)."""
        return self.model.arch == "t5" and self.model.positions in (None, "relative")

    def padded_vocab_size(self) -> int:
        """Vocab rounded up so it divides by make_vocab_size_divisible_by · TP."""
        if self.model.vocab_size is None:
            raise ConfigError("model.vocab_size is unset: set it, or set data.tokenizer_model so it can be read")
        mult = self.model.make_vocab_size_divisible_by * self.parallel.tensor
        return ((self.model.vocab_size + mult - 1) // mult) * mult

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: Optional[int] = None, check_files: bool = True) -> "Config":
        validate(self, world_size=world_size, check_files=check_files)
        return self


SECTIONS = [f.name for f in dataclasses.fields(Config)]
ARCHS = ("llama", "gpt2", "bert", "t5")
POSITIONS = {"bert": ("learned", "rotary"), "t5": ("relative", "rotary")}


def rms_swiglu(arch: str) -> bool:
    """Whether `arch`'s blocks are llama's (RMSNorm, SwiGLU MLP, no biases): llama and t5 (as T5 v1.1, with
    SwiGLU for its gated GELU); gpt2 and bert use LayerNorm, biases and a GELU MLP."""
    return arch in ("llama", "t5")


@dataclass(frozen=True)
class SpanLayout:
    """The fixed shape of model.arch=t5's samples: of a sample's model.seq_len text tokens, `noise` are hidden
    in `spans` spans; the encoder reads the rest with one sentinel per span (`encoder_len` tokens) and the
    decoder reads and predicts each span after its sentinel (`decoder_len` tokens, its labels shifted by one
    and closed by one more sentinel)."""
    noise: int
    spans: int
    encoder_len: int
    decoder_len: int


def text_vocab_size(cfg: Config) -> int:
    """How many ids text may hold: model.vocab_size less t5's sentinels (its top data.sentinel_tokens ids)."""
    return cfg.model.vocab_size - (cfg.data.sentinel_tokens if cfg.model.arch == "t5" else 0)


def span_layout(cfg: Config) -> SpanLayout:
    """Exact counts from data.span_noise_density and data.span_mean_length (the same for every sample, so
    batches have one shape): noise = round(density · seq_len) ≥ 1 tokens in spans = round(noise / mean) ≥ 1
    spans, at most one span per noise token and per kept token (spans alternate with kept text)."""
    d, n = cfg.data, cfg.model.seq_len
    noise = min(max(1, round(d.span_noise_density * n)), n - 1)
    spans = max(1, min(round(noise / d.span_mean_length), noise, n - noise))
    return SpanLayout(noise, spans, n - noise + spans, noise + spans)


# ---- loading ----------------------------------------------------------------------------

def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the dataclass field's type, or raise ConfigError."""
    origin = get_origin(hint)
    if origin is Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        inner = [a for a in get_args(hint) if a is not type(None)][0]
        return _coerce(value, inner, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan compares false with every bound a later check would apply
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        return str(value)
    if hint is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{source}: '{dotted}' is not of the form section.key (sections: {', '.join(SECTIONS)})")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section '{section}' in '{dotted}'; sections are {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    hints = get_type_hints(type(obj))
    if key not in hints:
        close = [k for k in hints if k.startswith(key[:3])]
        hint = f" (did you mean {', '.join(section + '.' + c for c in close)}?)" if close else ""
        raise ConfigError(f"{source}: unknown key '{dotted}'{hint}; valid keys: {', '.join(hints)}")
    setattr(obj, key, _coerce(value, hints[key], dotted))


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Config from a YAML file (or defaults) plus `section.key=value` overrides. Not yet validated."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections ({', '.join(SECTIONS)})")
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section '{section}'; sections are {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping of keys")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value, path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.max_steps=20)")
        dotted, value = item.split("=", 1)
        _set(cfg, dotted.strip(), yaml.safe_load(value) if value else None, "command line")
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with atomic_write(path) as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# ---- validation ---------------------------------------------------------------------------
def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: Optional[int] = None, check_files: bool = True) -> None:
    """Check every cross-key constraint; raise ConfigError naming the key and the fix."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _require(m.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}, got {m.arch!r}")
    _require(m.positions is None or m.positions in POSITIONS.get(m.arch, ()),
             f"model.positions={m.positions!r}: model.arch=bert chooses 'learned' or 'rotary', model.arch=t5 "
             f"'relative' or 'rotary' (gpt2 always learns them, llama always rotates); remove the key or fix its "
             f"value")
    _validate_masking(cfg)
    _validate_spans(cfg)
    for key in ("hidden_size", "n_layers", "n_heads", "seq_len"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _require(m.hidden_size % m.n_heads == 0,
             f"model.n_heads={m.n_heads} does not divide model.hidden_size={m.hidden_size}; "
             f"choose n_heads among the divisors of hidden_size")
    kv = cfg.kv_heads
    _require(kv > 0 and m.n_heads % kv == 0,
             f"model.n_kv_heads={kv} does not divide model.n_heads={m.n_heads}; "
             f"grouped-query attention needs n_heads to be a multiple of n_kv_heads")
    _require(cfg.mup.base_hidden_size > 0, "mup.base_hidden_size must be positive")
    _require(cfg.mup.init_std > 0, "mup.init_std must be positive")
    _require(p.tensor >= 1 and p.pipeline >= 1, "parallel.tensor and parallel.pipeline must be >= 1")
    _require(m.n_heads % p.tensor == 0,
             f"parallel.tensor={p.tensor} does not divide model.n_heads={m.n_heads}; pick a TP size dividing it")
    _require(kv % p.tensor == 0,
             f"parallel.tensor={p.tensor} does not divide the kv heads ({kv}); pick a TP size dividing "
             f"model.n_kv_heads")
    _require(cfg.ffn_hidden_size % p.tensor == 0,
             f"parallel.tensor={p.tensor} does not divide the MLP width {cfg.ffn_hidden_size}; "
             f"set model.ffn_hidden_size to a multiple of it")
    _validate_pipeline(cfg)
    _require(not (p.sequence_parallel and m.arch != "t5" and m.seq_len % p.tensor),  # t5: _validate_spans
             f"parallel.sequence_parallel needs model.seq_len ({m.seq_len}) divisible by parallel.tensor ({p.tensor})")
    _require(t.schedule in ("cosine", "wsd", "constant"),
             f"train.schedule must be 'cosine', 'wsd' or 'constant', got {t.schedule!r}")
    _require(t.optimizer in ("adamw", "muon"), f"train.optimizer must be 'adamw' or 'muon', got {t.optimizer!r}")
    _require(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be 'auto', 'fp32' or 'bf16', got {t.dtype!r}")
    _require(t.activation_checkpointing in ("none", "selective", "full"),
             f"train.activation_checkpointing must be 'none', 'selective' or 'full', "
             f"got {t.activation_checkpointing!r}")
    _require(not (t.compile and t.activation_checkpointing != "none" and m.dropout > 0 and p.tensor > 1),
             f"train.compile=true with train.activation_checkpointing={t.activation_checkpointing} cannot replay the "
             f"per-TP-rank dropout stream (model.dropout={m.dropout}, parallel.tensor={p.tensor}) in compiled "
             f"recomputation; set model.dropout=0, train.compile=false or train.activation_checkpointing=none")
    _require(cfg.data.loader_workers is None or cfg.data.loader_workers >= 0,
             f"data.loader_workers={cfg.data.loader_workers} must not be negative (0 = batches in the training "
             f"process, null = the device's default)")
    _require(t.micro_batch_size > 0 and t.global_batch_size > 0,
             "train.micro_batch_size and train.global_batch_size must be positive")
    _require(t.max_steps > 0, "train.max_steps must be positive")
    _require(p.timeout_minutes > 0, f"parallel.timeout_minutes={p.timeout_minutes} must be positive")
    _require(p.heartbeat_timeout_s >= 0,
             f"parallel.heartbeat_timeout_s={p.heartbeat_timeout_s} must not be negative (0 turns heartbeats off)")
    _require(t.preempt_grace_s >= 0,
             f"train.preempt_grace_s={t.preempt_grace_s} must not be negative (0 waits for the step however long)")
    _require(0 <= t.stop_at_step <= t.max_steps,
             f"train.stop_at_step={t.stop_at_step} must lie in [0, train.max_steps={t.max_steps}] (0 = no early stop)")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must not be negative")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must lie in [0, 1]")
    _require(t.lr > 0, "train.lr must be positive")
    if world_size is not None:
        accumulation_steps(cfg, data_parallel_size(cfg, world_size))
    _require(cfg.data.path is None or cfg.data.paths is None, "set only one of data.path and data.paths")
    if cfg.data.paths is not None:
        ps = cfg.data.paths
        _require(len(ps) % 2 == 0 and len(ps) > 0,
                 "data.paths must alternate weights and prefixes: [w1, prefix1, w2, prefix2, ...]")
        for w in ps[0::2]:
            _require(isinstance(w, (int, float)) and w > 0, f"data.paths: weight {w!r} must be a positive number")
    if check_files:
        for prefix in data_prefixes(cfg):
            for ext in (".bin", ".idx"):
                _require(os.path.isfile(prefix + ext),
                         f"data.path: {prefix + ext} not found; run megamu-preprocess or fix the prefix "
                         f"(it is the output prefix plus _<key>_document, e.g. data/sample_text_document)")
        if cfg.data.tokenizer_model is not None:
            _require(os.path.isfile(cfg.data.tokenizer_model),
                     f"data.tokenizer_model: {cfg.data.tokenizer_model} not found; train one with "
                     f"megamu-train-tokenizer")
        if t.deepspeed_config is not None:
            _require(os.path.isfile(t.deepspeed_config), f"train.deepspeed_config: {t.deepspeed_config} not found")


def _validate_masking(cfg: Config) -> None:
    d = cfg.data
    _require(0.0 < d.mlm_probability <= 1.0,
             f"data.mlm_probability={d.mlm_probability} must lie in (0, 1] (BERT predicts 0.15 of the tokens)")
    _require(d.mlm_mask_fraction >= 0 and d.mlm_random_fraction >= 0
             and d.mlm_mask_fraction + d.mlm_random_fraction <= 1.0,
             f"data.mlm_mask_fraction={d.mlm_mask_fraction} and data.mlm_random_fraction={d.mlm_random_fraction} "
             f"must be non-negative with a sum of at most 1 (the rest of the predicted tokens are kept; BERT: 0.8, "
             f"0.1)")
    vocab = cfg.model.vocab_size
    _require(d.mask_token_id is None or (d.mask_token_id >= 0 and (vocab is None or d.mask_token_id < vocab)),
             f"data.mask_token_id={d.mask_token_id} is not a token id of the vocabulary (0 .. model.vocab_size-1 = "
             f"{vocab}-1); set an id the data never holds, e.g. the tokenizer's <pad>")


def _validate_spans(cfg: Config) -> None:
    d, m, p = cfg.data, cfg.model, cfg.parallel
    _require(0.0 < d.span_noise_density < 1.0,
             f"data.span_noise_density={d.span_noise_density} must lie in (0, 1) (T5 hides 0.15 of the tokens)")
    _require(d.span_mean_length >= 1.0, f"data.span_mean_length={d.span_mean_length} must be at least 1 (T5: 3)")
    _require(d.sentinel_tokens >= 2, f"data.sentinel_tokens={d.sentinel_tokens} must be at least 2 (T5: 100)")
    if m.arch != "t5":
        return
    _require(m.seq_len >= 2, f"model.arch=t5 needs model.seq_len >= 2 (one hidden and one kept token), got {m.seq_len}")
    layout = span_layout(cfg)
    _require(layout.spans + 1 <= d.sentinel_tokens,
             f"model.seq_len={m.seq_len} makes {layout.spans} spans per sample, which need {layout.spans + 1} "
             f"sentinels (one per span and one closing the targets) but data.sentinel_tokens={d.sentinel_tokens}; "
             f"raise data.sentinel_tokens or data.span_mean_length")
    _require(m.vocab_size is None or m.vocab_size > d.sentinel_tokens,
             f"model.vocab_size={m.vocab_size} must exceed data.sentinel_tokens={d.sentinel_tokens} (the sentinels are "
             f"its top ids); unset model.vocab_size to take the tokenizer's pieces plus the sentinels")
    _require(p.pipeline == 1,
             f"model.arch=t5 with parallel.pipeline={p.pipeline}: the encoder-decoder is not pipelined (its decoder "
             f"reads the encoder's output at every block); set parallel.pipeline=1 and use tensor or data parallelism")
    if p.sequence_parallel and p.tensor > 1:
        lengths = (layout.encoder_len, layout.decoder_len)
        _require(all(n % p.tensor == 0 for n in lengths),
                 f"parallel.sequence_parallel with model.arch=t5 needs the encoder and decoder lengths "
                 f"{lengths} (from model.seq_len={m.seq_len}) divisible by parallel.tensor={p.tensor}; "
                 f"{_seq_len_hint(cfg)}")


def _seq_len_hint(cfg: Config) -> str:
    """A nearby model.seq_len whose t5 encoder and decoder lengths divide by parallel.tensor, as advice."""
    probe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model))
    for seq_len in range(cfg.model.seq_len, 4 * cfg.model.seq_len + 64):
        probe.model.seq_len = seq_len
        layout = span_layout(probe)
        if layout.encoder_len % cfg.parallel.tensor == 0 and layout.decoder_len % cfg.parallel.tensor == 0:
            return f"e.g. model.seq_len={seq_len}"
    return "change model.seq_len or parallel.tensor"


def fill_mask_token_id(cfg: Config) -> None:
    """data.mask_token_id for model.arch=bert when it is unset: the tokenizer's <pad> id, or for a tokenizer
    without one the id `fill_vocab_size` appended above its pieces."""
    d = cfg.data
    if cfg.model.arch != "bert" or d.mask_token_id is not None:
        return
    mask = None
    if d.tokenizer_model is not None and os.path.isfile(d.tokenizer_model):
        from megamu.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(d.tokenizer_model)
        mask = tokenizer.pad_id
        if mask is None and (cfg.model.vocab_size or 0) > tokenizer.vocab_size:
            mask = tokenizer.vocab_size  # the first id above the pieces: appended for it when vocab_size was filled
    if mask is None:
        raise ConfigError(f"model.arch=bert needs a mask token: data.mask_token_id is unset, data.tokenizer_model "
                          f"({d.tokenizer_model}) has no <pad> id to use and model.vocab_size "
                          f"({cfg.model.vocab_size}) leaves no id above its pieces; unset model.vocab_size (megamu then "
                          f"appends a mask id) or set data.mask_token_id to an id the data never holds")
    d.mask_token_id = mask


def _validate_pipeline(cfg: Config) -> None:
    p, n_layers = cfg.parallel, cfg.model.n_layers
    if p.pipeline == 1:
        _require(p.pipeline_blocks is None or list(p.pipeline_blocks) == [n_layers],
                 f"parallel.pipeline_blocks={p.pipeline_blocks} is set but parallel.pipeline=1; remove it or set "
                 f"parallel.pipeline to its length")
        return
    _require(p.pipeline <= n_layers,
             f"parallel.pipeline={p.pipeline} is larger than model.n_layers={n_layers}: every pipeline stage needs "
             f"at least one transformer block; use at most {n_layers} stages")
    if p.pipeline_blocks is not None:
        blocks = p.pipeline_blocks
        _require(len(blocks) == p.pipeline and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                   for b in blocks) and sum(blocks) == n_layers,
                 f"parallel.pipeline_blocks={blocks} must give each of the parallel.pipeline={p.pipeline} stages a "
                 f"positive number of transformer blocks, summing to model.n_layers={n_layers} "
                 f"(e.g. {even_pipeline_split(n_layers, p.pipeline)})")
    # Refused rather than untested: DeepSpeed's pipeline engine with Megatron-style SP is broken upstream.
    _require(not (p.sequence_parallel and p.tensor > 1),
             f"parallel.sequence_parallel=true with parallel.pipeline={p.pipeline}: pipeline plus sequence "
             f"parallelism is broken in DeepSpeed (issue 4196); set parallel.sequence_parallel=false")


def even_pipeline_split(n_layers: int, stages: int) -> list[int]:
    """Blocks per stage, as even as possible; the earlier stages take the remainder (the last one also
    carries the final norm, the readout and the loss)."""
    return [n_layers // stages + (1 if s < n_layers % stages else 0) for s in range(stages)]


def pipeline_blocks(cfg: Config) -> list[int]:
    """Transformer blocks on each pipeline stage: parallel.pipeline_blocks, or an even split."""
    p = cfg.parallel
    return list(p.pipeline_blocks) if p.pipeline_blocks is not None else even_pipeline_split(cfg.model.n_layers,
                                                                                               p.pipeline)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """world size / (TP × PP), or ConfigError when the model-parallel grid does not tile the world."""
    model_par = cfg.parallel.tensor * cfg.parallel.pipeline
    _require(world_size % model_par == 0,
             f"world size {world_size} is not divisible by parallel.tensor × parallel.pipeline = {model_par}; "
             f"launch a multiple of {model_par} processes")
    return world_size // model_par


def accumulation_steps(cfg: Config, dp_size: int) -> int:
    """Micro batches per optimizer step on each data-parallel rank, for cfg.train's batch sizes."""
    return batch_accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_size)


def batch_accumulation(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """The one global-batch rule: global batch = micro batch × data-parallel size × accumulation steps."""
    _require(micro_batch_size > 0 and dp_size > 0,
             f"train.micro_batch_size ({micro_batch_size}) and the data-parallel size ({dp_size}) must be positive")
    per_step = micro_batch_size * dp_size
    _require(global_batch_size > 0 and global_batch_size % per_step == 0,
             f"train.global_batch_size={global_batch_size} is not a positive multiple of train.micro_batch_size "
             f"({micro_batch_size}) × data-parallel size ({dp_size}) = {per_step}; set it to a multiple of "
             f"{per_step}")
    return global_batch_size // per_step


def fill_vocab_size(cfg: Config) -> None:
    """model.vocab_size from data.tokenizer_model when it is unset."""
    if cfg.model.vocab_size is not None:
        return
    path = cfg.data.tokenizer_model
    if path is None:
        raise ConfigError("model.vocab_size is unset and data.tokenizer_model is unset: set one of them "
                          "(the vocabulary size is read from the tokenizer)")
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer_model: {path} not found; train one with megamu-train-tokenizer")
    from megamu.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(path)
    cfg.model.vocab_size = tokenizer.vocab_size + appended_ids(cfg, tokenizer.pad_id)


def appended_ids(cfg: Config, tokenizer_pad_id: Optional[int]) -> int:
    """Ids the vocabulary holds above the tokenizer's pieces: t5's sentinels, or one mask id for bert when the
    tokenizer has no <pad> to use as the mask and data.mask_token_id names none."""
    if cfg.model.arch == "t5":
        return cfg.data.sentinel_tokens
    return int(cfg.model.arch == "bert" and cfg.data.mask_token_id is None and tokenizer_pad_id is None)


def check_sentinel_room(cfg: Config) -> None:
    """model.arch=t5: the sentinels (the top data.sentinel_tokens ids) must lie above every tokenizer piece."""
    d = cfg.data
    if cfg.model.arch != "t5" or d.tokenizer_model is None or not os.path.isfile(d.tokenizer_model):
        return
    from megamu.data.tokenizer import Tokenizer

    pieces = Tokenizer(d.tokenizer_model).vocab_size
    _require(cfg.model.vocab_size - d.sentinel_tokens >= pieces,
             f"model.vocab_size={cfg.model.vocab_size} leaves no room for the data.sentinel_tokens={d.sentinel_tokens} "
             f"sentinel ids above the {pieces} pieces of {d.tokenizer_model}; unset model.vocab_size (megamu adds the "
             f"sentinels to the tokenizer's pieces) or set it to at least {pieces + d.sentinel_tokens}")


def resolve(cfg: Config, world_size: Optional[int] = None, *, need_data: bool = False,
            check_files: bool = True) -> list[str]:
    """Make `cfg` complete and check it, once, before anything is allocated; returns notes to print once.

    Fills model.vocab_size from the tokenizer, shortens a warm-up longer than the run to the run (a smoke
    run with train.max_steps=10 just works), validates every key and, given `world_size`, the parallel
    layout and the global-batch rule, and finds a shipped DeepSpeed json named by train.deepspeed_config.
    `need_data`: training needs data.path or data.paths.
    """
    notes = []
    fill_vocab_size(cfg)
    check_sentinel_room(cfg)
    t = cfg.train
    if t.deepspeed_config is not None and not os.path.isfile(t.deepspeed_config):
        # A shipped json by name ("zero1") or by its checkout path ("ds_configs/zero1.json"): both work after
        # a plain `pip install`, where no ds_configs/ folder exists beside the user's config. Any other
        # missing path stays an error rather than silently becoming a shipped file of the same name.
        stem = t.deepspeed_config
        if os.path.dirname(stem) == "ds_configs" and stem.endswith(".json"):
            stem = os.path.basename(stem)[:-len(".json")]
        try:
            t.deepspeed_config = shipped_path(stem, DEEPSPEED)
        except ConfigError as e:
            raise ConfigError(f"train.deepspeed_config: {t.deepspeed_config} not found; {e}") from None
    if t.max_steps > 0 and t.warmup_steps > t.max_steps:
        notes.append(f"train.warmup_steps={t.warmup_steps} is longer than train.max_steps={t.max_steps}: "
                     f"warming up over the whole run ({t.max_steps} steps)")
        t.warmup_steps = t.max_steps
    validate(cfg, world_size=world_size, check_files=check_files)
    if need_data and not data_prefixes(cfg):
        raise ConfigError("no training data: set data.path (one prefix) or data.paths ([w1, prefix1, ...])")
    if need_data:
        fill_mask_token_id(cfg)
    return notes


def data_prefixes(cfg: Config) -> list:
    if cfg.data.paths is not None:
        return [str(p) for p in cfg.data.paths[1::2]]
    return [cfg.data.path] if cfg.data.path is not None else []
