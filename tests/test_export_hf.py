"""Hugging Face export, generation, evaluation and import (issue 14).

Export (megamu-export-hf): for a trained tiny μP model of each architecture (llama saved as TP=2 shards,
llama + QK-norm, gpt2 with grouped-query heads saved as PP=2 layer files) the exported directory loads through AutoModelForCausalLM
with the standard class and its logits equal megamu's (fp32: 1e-4 max abs; bf16: the stated tolerance);
AutoTokenizer encodes and decodes as megamu's SentencePiece model; a run without a complete checkpoint, an
unexportable model or layout, or a missing transformers is one `error:` line. Generation: KV-cache logits
equal the full forward's, greedy tokens equal transformers' generate on the export, sampling is seeded.
megamu-eval: exact bits per byte against per-token forward passes. lm-evaluation-harness (its Python API on a local
task file) scores every choice on the export as megamu's model does. Import (megamu-import-hf): the imported
model's logits equal transformers', and a real TP=2 run starts from the imported weights. (ZeRO 3 export:
tests/test_zero3.py, which has the runs.)"""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from dist import run_train
from megamu.checkpoint import merge_run_checkpoint, tag_for, write_pointer
from megamu.cli.export_hf import main as export_main
from megamu.cli.evaluate import main as eval_main
from megamu.cli.generate import main as generate_main
from megamu.cli.import_hf import main as import_main
from megamu.config import Config, load_config, save_config
from megamu.data.indexed import IndexedDatasetWriter
from megamu.data.tokenizer import Tokenizer
from megamu.errors import MegamuWarning
from megamu.export.decode import KVCache, forward_cached
from megamu.export.importer import import_hf
from megamu.export.sampling import Sampling, generate, top_p_filter
from megamu.model import build_model, parameter_layout
from test_train_e2e import write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3
FP32_TOL = 1e-4
# bf16 weights keep 8 significant bits: the logits move by a fraction of a percent of their largest magnitude
# (measured 0.4-0.6% for these models); the tolerance is 2% of the largest |logit|
BF16_REL_TOL = 0.02
VARIANTS = {
    "llama_tp2": ("model.n_kv_heads=2", "parallel.tensor=2"),
    "llama_qk_norm": ("model.n_kv_heads=2", "model.qk_norm=true"),
    "gpt2_pp2": ("model.arch=gpt2", "model.n_kv_heads=2", "parallel.pipeline=2"),
}
EXPECTED_CLASS = {"llama_tp2": "LlamaForCausalLM", "llama_qk_norm": "Qwen3ForCausalLM", "gpt2_pp2": "GPT2LMHeadModel"}


def tiny_cfg(tokenizer_model: str, *overrides: str) -> Config:
    """m = 2 and non-default μP multipliers, so every fold matters; a padded vocabulary (512 → 576)."""
    base = ["model.hidden_size=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=32", "model.vocab_size=512",
            "model.make_vocab_size_divisible_by=96", "mup.base_hidden_size=32", "mup.input_mult=1.7",
            "mup.output_mult=0.6", "mup.attn_mult=3.0", "train.seed=5", f"data.tokenizer_model={tokenizer_model}"]
    return load_config(None, base + list(overrides))


def train_briefly(cfg: Config) -> torch.nn.Module:
    """A few AdamW steps on random tokens (TP=1), so norms, biases and the zero-initialised readout move."""
    single = load_config(None, [])
    single.model, single.mup, single.train = cfg.model, cfg.mup, cfg.train
    model = build_model(single)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1), generator=generator)
        model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def save_run(cfg: Config, model: torch.nn.Module, run_dir: str) -> None:
    """A run directory as megamu's trainer leaves it: config.yaml, DeepSpeed's model files of every TP rank
    (one mp_rank file each, or under PP one file per pipeline layer), the pointer."""
    folder = os.path.join(run_dir, "checkpoints", tag_for(STEPS))
    os.makedirs(folder)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    tp = cfg.parallel.tensor
    layout = parameter_layout(cfg)
    for rank in range(tp):
        shard = {}
        for name, tensor in model.state_dict().items():
            dim = layout[name][0]
            if dim is not None and layout[name][1] in ("embedding", "readout"):
                tensor = torch.cat([tensor, tensor.new_zeros(cfg.padded_vocab_size() - tensor.size(0), tensor.size(1))])
            shard[name] = tensor if dim is None else tensor.chunk(tp, dim=dim)[rank].clone()
        if cfg.parallel.pipeline == 1:
            torch.save({"module": shard}, os.path.join(folder, f"mp_rank_{rank:02d}_model_states.pt"))
            continue
        for layer in range(cfg.model.n_layers + 3):
            prefix = f"layers.{layer}."
            own = {name[len(prefix):]: tensor for name, tensor in shard.items() if name.startswith(prefix)}
            torch.save(own, os.path.join(folder, f"layer_{layer:02d}-model_{rank:02d}-model_states.pt"))
    write_pointer(os.path.join(run_dir, "checkpoints"), tag_for(STEPS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer) -> dict[str, tuple[torch.nn.Module, str]]:
    """Per variant: the trained megamu model and its run directory."""
    root = tmp_path_factory.mktemp("export_runs")
    out = {}
    for variant, overrides in VARIANTS.items():
        cfg = tiny_cfg(tiny_tokenizer.model_path, *overrides)
        model = train_briefly(cfg)
        save_run(cfg, model, str(root / variant))
        out[variant] = (model, str(root / variant))
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for variant, (_model, run_dir) in runs.items():
        out[variant] = str(root / variant)
        assert export_main([run_dir, out[variant]]) == 0
    return out


def sample_tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))


def megamu_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_tokens())[..., :512]


def hf_logits(out_dir: str) -> tuple[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return type(model).__name__, model(sample_tokens()).logits.float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_logits_equal_megamu_in_fp32(variant, runs, exported):
    name, got = hf_logits(exported[variant])
    assert name == EXPECTED_CLASS[variant]
    want = megamu_logits(runs[variant][0])
    assert got.shape == want.shape == (2, 32, 512)
    assert want.abs().max() > 0.1  # a trained readout, not the zero init
    assert (got - want).abs().max().item() < FP32_TOL
    files = sorted(os.listdir(exported[variant]))
    for required in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert required in files


def test_bf16_export_is_within_its_tolerance(runs, tmp_path, capsys):
    _model, run_dir = runs["llama_qk_norm"]
    assert export_main([run_dir, str(tmp_path), "--dtype", "bf16"]) == 0
    assert "bf16" in capsys.readouterr().out
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "model.safetensors")).values()} == {torch.bfloat16}
    _name, got = hf_logits(str(tmp_path))
    want = megamu_logits(runs["llama_qk_norm"][0])
    error = (got - want).abs().max().item()
    assert FP32_TOL < error < BF16_REL_TOL * want.abs().max().item()  # really rounded, and stayed close


TRICKY_TEXTS = ["plain words", " leading space", "double  space and trailing ", "tabs\tand\nnew\n\nlines\r\n",
                "   ", "naïve café, 日本語 🤖", "\x00\x07 control bytes \x7f", "digits 1234567 3.14159",
                "literal </s> and <s> and <pad> text", "<0x41> looks like a byte piece"]


def test_auto_tokenizer_encodes_and_decodes_as_megamu(exported, tiny_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(exported["llama_tp2"])
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 3)
    for text in TRICKY_TEXTS:
        ids = tiny_tokenizer.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == tiny_tokenizer.decode(ids) == text
    byte_fallback = tiny_tokenizer.encode("🤖")
    assert all(tiny_tokenizer.id_to_piece(i).startswith("<0x") for i in byte_fallback)  # really outside the vocab


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_run_without_a_complete_checkpoint_is_one_error_line(tmp_path, tiny_tokenizer, capsys):
    save_config(tiny_cfg(tiny_tokenizer.model_path), str(tmp_path / "config.yaml"))
    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "latest_complete not found" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_zero3_checkpoint_under_tensor_parallelism_is_refused_naming_why(tmp_path, tiny_tokenizer, capsys):
    save_config(tiny_cfg(tiny_tokenizer.model_path, "parallel.tensor=2"), str(tmp_path / "config.yaml"))
    folder = tmp_path / "checkpoints" / tag_for(STEPS)
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    write_pointer(str(tmp_path / "checkpoints"), tag_for(STEPS))
    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is a ZeRO 3 checkpoint with parallel.tensor=2" in error_line(capsys)


def test_gpt2_with_qk_norm_is_refused_naming_why(tmp_path, tiny_tokenizer, capsys):
    cfg = tiny_cfg(tiny_tokenizer.model_path, "model.arch=gpt2", "model.qk_norm=true")
    save_run(cfg, build_model(cfg), str(tmp_path / "run"))
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "GPT2LMHeadModel has no per-head q/k LayerNorm" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_transformers_says_how_to_install_it(monkeypatch, runs, tmp_path, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    assert export_main([runs["gpt2_pp2"][1], str(tmp_path / "out")]) == 2
    assert "pip install 'megamu[export]'" in error_line(capsys)



@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_gives_the_full_forwards_logits(variant, runs):
    model = runs[variant][0]
    ids = sample_tokens()[:, :20]
    cache = KVCache()
    pieces = [forward_cached(model, ids[:, :7], cache), forward_cached(model, ids[:, 7:10], cache)]
    pieces += [forward_cached(model, ids[:, i:i + 1], cache) for i in range(10, 20)]
    assert cache.length == 20
    with torch.no_grad():
        want = model(ids)[..., :512]
    assert (torch.cat(pieces, dim=1) - want).abs().max().item() < 1e-5


def hf_greedy(out_dir: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_equals_transformers_generate_on_the_export(variant, runs, exported):
    prompt = sample_tokens()[0, :9].tolist()
    got = generate(runs[variant][0], prompt, Sampling(max_new_tokens=16, temperature=0), eos_id=2)
    assert got == hf_greedy(exported[variant], prompt, 16)


def test_megamu_generate_prints_the_greedy_continuation(runs, exported, tiny_tokenizer, capsys):
    prompt = "The quick brown fox"
    assert generate_main([runs["llama_qk_norm"][1], "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", "8"]) == 0
    want = hf_greedy(exported["llama_qk_norm"], tiny_tokenizer.encode(prompt), 8)
    assert capsys.readouterr().out == prompt + tiny_tokenizer.decode(want) + "\n"


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(runs):
    model = runs["gpt2_pp2"][0]
    prompt = sample_tokens()[0, :5].tolist()

    def sample(**kwargs) -> list[int]:
        return generate(model, prompt, Sampling(max_new_tokens=10, **kwargs), eos_id=None)

    assert sample(seed=1) == sample(seed=1) != sample(seed=2)
    assert sample(seed=3, top_p=1e-6) == sample(temperature=0)  # a nucleus of one token is greedy
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0]).log_softmax(-1)  # probabilities ≈ .61 .22 .14 .03
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.85)).tolist() == [True, True, True, False]


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be ≥ 0"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_sampling_flags_are_one_error_line(flags, message, runs, capsys):
    assert generate_main([runs["gpt2_pp2"][1], "--prompt", "hi", *flags]) == 2
    assert re.search(message, error_line(capsys))


BPB_TEXTS = ["short one", "A longer document with  double spaces,\\nnewlines and ünïcödé bytes 🤖. " * 2, "x",
             "tail text"]


@pytest.fixture(scope="module")
def validation_run(runs, tiny_tokenizer, tmp_path_factory) -> tuple[torch.nn.Module, str]:
    """The QK-norm run with data whose split puts BPB_TEXTS (one longer than seq_len) in the validation range."""
    root = tmp_path_factory.mktemp("bpb")
    prefix = str(root / "val_text_document")
    with IndexedDatasetWriter(prefix, "uint16") as writer:
        for text in ["a training document"] + BPB_TEXTS:
            writer.add_document(tiny_tokenizer.encode(text) + [tiny_tokenizer.eod_id])
    model = runs["llama_qk_norm"][0]
    cfg = tiny_cfg(tiny_tokenizer.model_path, *VARIANTS["llama_qk_norm"], f"data.path={prefix}", "data.split=1,4,0")
    save_run(cfg, model, str(root / "run"))
    return model, str(root / "run")


def brute_force_bits(model: torch.nn.Module, document: list[int], seq_len: int) -> float:
    """Each token scored by its own forward pass, with the context of its window (windows of seq_len predictions)."""
    stream, bits = [2] + document, 0.0
    for j in range(len(document)):
        context = stream[(j // seq_len) * seq_len:j + 1]
        with torch.no_grad():
            logits = model(torch.tensor([context]))[0, -1, :512]
        bits -= logits.log_softmax(-1)[document[j]].item() / math.log(2)
    return bits


def test_exact_bits_per_byte_scores_every_validation_document_over_its_own_bytes(validation_run, tiny_tokenizer,
                                                                                 tmp_path, capsys):
    model, run_dir = validation_run
    json_path = str(tmp_path / "eval.json")
    assert eval_main([run_dir, "--batch-size", "3", "--json", json_path]) == 0
    got = json.load(open(json_path))
    documents = [tiny_tokenizer.encode(text) + [2] for text in BPB_TEXTS]
    assert max(map(len, documents)) > 2 * 32  # one document needs three windows
    bits = sum(brute_force_bits(model, document, 32) for document in documents)
    want_bytes = sum(len(text.encode("utf-8")) for text in BPB_TEXTS)
    assert (got["documents"], got["tokens"], got["bytes"]) == (4, sum(map(len, documents)), want_bytes)
    assert got["val_bpb"] == pytest.approx(bits / want_bytes, rel=1e-5)
    assert got["val_loss"] == pytest.approx(bits * math.log(2) / got["tokens"], rel=1e-5)
    assert f"{got['val_bpb']:.4f} bits/byte" in capsys.readouterr().out


def import_logits_gap(hf_dir: str) -> float:
    """Max |logit difference| between the transformers model in hf_dir and megamu's import of it."""
    from transformers import AutoModelForCausalLM

    cfg, state = import_hf(hf_dir, load_config(None, ["model.seq_len=32"]))
    model = build_model(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(sample_tokens()).logits
        got = model.eval()(sample_tokens())[..., :want.shape[-1]]
    return (got - want).abs().max().item()


@pytest.mark.parametrize("variant", ["llama_tp2", "llama_qk_norm"])
def test_imported_logits_equal_the_transformers_models(variant, exported):
    with pytest.warns(MegamuWarning, match="no μP base width"):
        assert import_logits_gap(exported[variant]) < FP32_TOL


def test_a_tied_llama_imports_with_its_embedding_as_readout(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    assert import_logits_gap(str(tmp_path)) < FP32_TOL


def test_a_model_megamu_cannot_compute_is_refused_naming_why(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, attention_bias=True, hidden_act="gelu")
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    capsys.readouterr()  # save_pretrained's progress bar
    assert import_main([str(tmp_path / "hf"), "--config", "tiny", "--out", str(tmp_path / "run")]) == 2
    assert re.search(r"cannot be imported exactly: it has hidden_act 'gelu' .*; attention or MLP biases",
                     error_line(capsys))


def test_an_import_continues_pretraining_at_tp2(exported, tiny_tokenizer, tiny_dataset_prefix, tmp_path):
    """megamu-import-hf, then a real TP=2 run from its config: the run starts from the imported weights (one
    step at a negligible LR leaves them in its checkpoint)."""
    config = write_config(str(tmp_path / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, "unused")
    run_dir = str(tmp_path / "imported")
    assert import_main([exported["llama_tp2"], "--config", config, "--out", run_dir]) == 0
    result = run_train(["--config", os.path.join(run_dir, "config.yaml"), "parallel.tensor=2", "train.max_steps=1",
                        "train.lr=1e-9", "train.warmup_steps=0", "train.eval_interval=0"], 2)
    assert result.ok, result.describe()
    imported = torch.load(os.path.join(run_dir, "imported.pt"))
    trained = merge_run_checkpoint(run_dir)
    assert trained.keys() == imported.keys()
    for name, tensor in imported.items():
        assert torch.allclose(trained[name], tensor, atol=1e-6), name


def test_a_normalizing_sentencepiece_model_is_refused(runs, tmp_path, capsys):
    import sentencepiece as spm

    prefix = str(tmp_path / "nfkc")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(BPB_TEXTS * 20), model_prefix=prefix, vocab_size=60,
                                   model_type="bpe", minloglevel=2)  # SentencePiece's defaults: NFKC, collapsed spaces
    assert export_main([runs["gpt2_pp2"][1], str(tmp_path / "out"), "--tokenizer-model", prefix + ".model"]) == 2
    assert "normalizes text (nmt_nfkc); collapses runs of spaces" in error_line(capsys)
    assert not (tmp_path / "out").exists()


# A local multiple-choice task for lm-evaluation-harness: the question is the context, each choice follows it
# after the harness's default " " delimiter; "gold" is the index of the right choice.
LOCAL_TASK = """task: megamu_local_mc
dataset_path: json
dataset_kwargs:
  data_files: {data_file}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""
LOCAL_ITEMS = [("The sky is", ["blue", "green", "loud"], 0), ("Two plus two is", ["four", "five"], 0),
               ("Cats like to", ["sleep", "fly", "swim"], 0), ("Water is", ["dry", "wet"], 1),
               ("Fire is", ["cold", "hot", "blue"], 1), ("The sun rises in the", ["west", "east"], 1)]


def continuation_logprob(model: torch.nn.Module, tokenizer: Tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) by megamu's model, the context's ids being a prefix of the whole text's."""
    context_ids, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
    assert whole[:len(context_ids)] == context_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([whole]))[0, :-1, :512].log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_lm_eval_harness_scores_a_local_task_on_the_export_as_megamu_does(runs, exported, tiny_tokenizer, tmp_path):
    """lm-evaluation-harness's Python API loads the exported llama as its "hf" model and scores a local task file
    (no download): every choice's log-likelihood and the accuracy equal megamu's own scoring of the items."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data_file = tmp_path / "items.jsonl"
    lines = [json.dumps({"question": q, "choices": c, "gold": g}) + "\n" for q, c, g in LOCAL_ITEMS]
    data_file.write_text("".join(lines))
    (tmp_path / "megamu_local_mc.yaml").write_text(LOCAL_TASK.format(data_file=data_file))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={exported['llama_tp2']},dtype=float32", tasks=["megamu_local_mc"],
        device="cpu", batch_size=1, task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    model = runs["llama_tp2"][0]
    samples = sorted(results["samples"]["megamu_local_mc"], key=lambda sample: sample["doc_id"])
    correct = []
    for sample, (question, choices, gold) in zip(samples, LOCAL_ITEMS, strict=True):
        want = [continuation_logprob(model, tiny_tokenizer, question, " " + choice) for choice in choices]
        got = [response[0][0] for response in sample["resps"]]
        assert got == pytest.approx(want, abs=FP32_TOL), question
        correct.append(max(range(len(want)), key=want.__getitem__) == gold)
    assert 0 < sum(correct) < len(correct)  # the seeded model gets some right and some wrong: acc is informative
    assert results["results"]["megamu_local_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
