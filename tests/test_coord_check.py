"""Coordinate check: flat under μP, growing under SP (llama, bert and t5), not flat when one μP rule is broken,
and widened by the ladder's width rule (head dim 16 here: 4 to 32 heads over widths 64 to 512)."""
import json

import pytest

from megamu.cli import coord_check as coord_check_tool
from megamu.config import ConfigError, load_config
from megamu.model import mup
from megamu.scaling import coord_check
from megamu.scaling.widths import width_overrides

WIDTHS = [64, 128, 256, 512]
STEPS = 3
# μP: |slope| of log mean|act| vs log width. At train.seed 1234 the largest over modules and steps is 0.18
# (the logits; other seeds reach 0.26), SP's logits 1.4 and a broken rule's worst module ≥ 0.86.
FLAT = 0.25
GROWING = 0.5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = ["model.vocab_size=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=16", "model.hidden_size=64",
         "mup.base_hidden_size=64", "train.lr=3e-3"]
# The decoder (llama) and the encoder (bert: bidirectional, masked-LM head, masked batches; id 3 as the mask).
# The encoder-decoder (t5: cross-attention watched too; 4 sentinels on top of 28 text ids).
ARCHS = {"llama": [], "bert": ["model.arch=bert", "data.mask_token_id=3"],
         "t5": ["model.arch=t5", "data.sentinel_tokens=4"]}


def small_cfg(arch: str = "llama"):
    # Tiny vocabulary and one short sequence per step: the updates stay correlated with the activations
    # they act on, so finite-width noise does not swamp the width trend at these small widths.
    return load_config(None, SMALL + ARCHS[arch])


@pytest.fixture(scope="module")
def batches():
    return coord_check.token_batches(small_cfg(), STEPS + 1, batch_size=1)


@pytest.fixture(scope="module")
def results(batches):
    """(arch, mup_enabled) → the coordinate check of that arch's small model, computed once."""
    cache = {}

    def result(arch: str, mup_enabled: bool) -> dict:
        if (arch, mup_enabled) not in cache:
            cfg = small_cfg(arch)
            arch_batches = batches if arch == "llama" else coord_check.token_batches(cfg, STEPS + 1, batch_size=1)
            cache[arch, mup_enabled] = coord_check.run_coord_check(cfg, WIDTHS, STEPS, arch_batches,
                                                                   mup_enabled=mup_enabled)
        return cache[arch, mup_enabled]

    return result


@pytest.fixture(scope="module")
def mup_result(results):
    return results("llama", True)


def test_records_cover_every_block_module_width_and_step(mup_result):
    assert mup_result["parametrization"] == "mup" and mup_result["widths"] == WIDTHS
    expected_modules = {"embedding", "logits"} | {f"block{i}.{part}" for i in range(2)
                                                  for part in ("attn", "mlp", "residual")}
    keys = {(r["width"], r["step"], r["module"]) for r in mup_result["records"]}
    assert keys == {(w, s, m) for w in WIDTHS for s in range(STEPS + 1) for m in expected_modules}
    assert all(set(r) == {"width", "step", "module", "mean_abs"} for r in mup_result["records"])
    logits_at_init = [r["mean_abs"] for r in mup_result["records"] if r["module"] == "logits" and r["step"] == 0]
    assert logits_at_init == [0.0] * len(WIDTHS)  # zero-initialised readout
    json.dumps(mup_result)


def test_t5_records_its_encoder_and_decoder_blocks_and_cross_attention(results):
    modules = {r["module"] for r in results("t5", True)["records"]}
    blocks = {f"block{i}.{part}" for i in range(4) for part in ("attn", "mlp", "residual")}  # 2 encoder, 2 decoder
    assert modules == {"embedding", "logits"} | blocks | {"block2.cross", "block3.cross"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_mup_is_flat_after_training_steps(results, arch):
    for step in range(STEPS + 1):
        slopes = coord_check.slopes(results(arch, True), step)
        assert max(abs(s) for s in slopes.values()) < FLAT, (step, slopes)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sp_logits_grow_with_width(results, arch):
    slopes = coord_check.slopes(results(arch, False), STEPS)
    assert slopes["logits"] > GROWING, slopes
    assert slopes["block1.mlp"] > GROWING, slopes


@pytest.mark.parametrize("mup_enabled", [True, False])
def test_every_width_is_the_model_the_ladder_launches(mup_enabled):
    """Each width is the config a ladder rung is launched with: proxy overrides + the rule's overrides."""
    proxy_overrides = [*SMALL, f"mup.enabled={mup_enabled}"]
    proxy = load_config(None, proxy_overrides)
    for width in WIDTHS:
        checked = coord_check.width_config(small_cfg(), width, mup_enabled)
        assert checked == load_config(None, [*proxy_overrides, *width_overrides(proxy, width)])
        assert (checked.model.n_heads, checked.head_dim) == (width // 16, 16)
        assert mup.attention_scale(checked) == pytest.approx(0.25, rel=1e-12)  # the proxy's 1/sqrt(16)


def test_a_width_off_the_width_rule_is_refused(batches):
    with pytest.raises(ConfigError, match="width 72 is not a positive multiple of the head dimension 16"):
        coord_check.run_coord_check(small_cfg(), [64, 72], STEPS, batches)


def _breaking(monkeypatch, rule: str) -> None:
    if rule == "logits_not_divided_by_m":
        monkeypatch.setattr(mup, "output_multiplier", lambda cfg: cfg.mup.output_mult)
    else:  # hidden matrices trained at η instead of η/m
        make_groups = mup.param_groups

        def unscaled_groups(model, cfg):
            groups = make_groups(model, cfg)
            for group in groups:
                group["lr_mult"], group["lr"] = 1.0, cfg.train.lr
            return groups

        monkeypatch.setattr(mup, "param_groups", unscaled_groups)


@pytest.mark.parametrize("rule", ["logits_not_divided_by_m", "hidden_lr_not_divided_by_m"])
def test_breaking_one_mup_rule_makes_the_check_fail(monkeypatch, batches, rule):
    _breaking(monkeypatch, rule)
    result = coord_check.run_coord_check(small_cfg(), WIDTHS, STEPS, batches, mup_enabled=True)
    slopes = coord_check.slopes(result, STEPS)
    assert max(slopes.values()) > GROWING, slopes


def test_seeds_average_mean_abs_over_inits(batches):
    cfg = small_cfg()
    one_width = dict(widths=[32], steps=1, batches=batches)
    averaged = coord_check.run_coord_check(cfg, seeds=2, **one_width)["records"]
    first = coord_check.run_coord_check(cfg, **one_width)["records"]
    cfg.train.seed += 1
    second = coord_check.run_coord_check(cfg, **one_width)["records"]
    assert first != second
    for a, r1, r2 in zip(averaged, first, second):
        assert (a["step"], a["module"]) == (r1["step"], r1["module"])
        assert a["mean_abs"] == pytest.approx((r1["mean_abs"] + r2["mean_abs"]) / 2)


def test_tool_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "coord.json", tmp_path / "coord.png"
    argv = ["--widths", "32,64", "--steps", "1", "--sp", "--batch-size", "1", "--json", str(out_json),
            "--plot", str(out_png), "model.vocab_size=32", "model.hidden_size=32", "model.n_layers=1",
            "model.n_heads=2", "model.seq_len=8", "mup.base_hidden_size=32"]
    assert coord_check_tool.main(argv) == 0
    result = json.loads(out_json.read_text())
    assert result["parametrization"] == "sp" and result["widths"] == [32, 64]
    assert {r["step"] for r in result["records"]} == {0, 1}
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "logits" in capsys.readouterr().out


def test_tool_reports_a_missing_vocab_size(tmp_path, capsys):
    assert coord_check_tool.main(["--json", str(tmp_path / "x.json")]) == 2
    assert "model.vocab_size" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_real_batches_come_from_an_indexed_dataset(tmp_path):
    from megamu.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path / "toy")
    with IndexedDatasetWriter(prefix, "uint16") as writer:
        for doc in ([1, 2, 3, 4, 5], [6, 7, 8], list(range(9, 30))):
            writer.add_document(doc)
    cfg = load_config(None, ["model.vocab_size=32", "model.seq_len=4"])
    batches = coord_check.token_batches(cfg, n_batches=2, batch_size=2, data_prefix=prefix)
    assert [b.tolist() for b in batches] == [[[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]],
                                             [[11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]]
    with pytest.raises(ConfigError, match="needs 40"):
        coord_check.token_batches(cfg, n_batches=4, batch_size=2, data_prefix=prefix)
