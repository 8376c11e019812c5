"""model.arch=t5 through the real trainer and the μScaling tools: span-corruption samples from the .bin/.idx
data, the loss falls, a TP=2 run with sequence parallelism stopped and resumed and a ZeRO 3 run over two
data-parallel ranks give the single process's losses, and decoder-only tools refuse it (its ladder is planned
with its own parameter counts: test_ladder.py)."""
from __future__ import annotations

from megamu.cli import generate as generate_tool
from test_train_e2e import MAX_STEPS, losses, read_records, same_losses, stopped_and_resumed, train_ok, write_config

# seq_len 40: 6 hidden tokens in 2 spans, encoder 36 and decoder 8 positions (even, for SP over 2 ranks)
T5 = ["model.arch=t5", "model.seq_len=40"]


def test_trainer_runs_t5_the_loss_falls_and_tp2_sp_resumed_and_zero3_dp2_equal_one_process(
        tmp_path, tiny_tokenizer, tiny_dataset_prefix, capsys):
    config = write_config(str(tmp_path / "t5.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix,
                          str(tmp_path / "runs"))
    whole = losses(train_ok(config, tmp_path / "whole", *T5))
    assert len(whole) == MAX_STEPS and whole[MAX_STEPS] < whole[1]
    evaluations = read_records(str(tmp_path / "whole"), "eval")
    # The loss covers the hidden spans only: no bits per byte of the text is claimed for it.
    assert evaluations and all(r["val_loss"] > 0 and r["val_bpb"] is None for r in evaluations)
    # Stopped after step 3 and resumed on two TP ranks with the sequences split: the same samples (spans drawn
    # per sample index, not per rank or per resume) and the same model, so the single process's losses.
    stopped, tp2 = tmp_path / "stopped", ("parallel.tensor=2", "parallel.sequence_parallel=true")
    resumed = stopped_and_resumed(config, stopped, *T5, *tp2, nprocs=2)
    assert same_losses(resumed, whole), (resumed, whole)
    # ZeRO 3 over two data-parallel ranks: the embedding, shared by encoder and decoder, is gathered twice a step.
    zero3 = losses(train_ok(config, tmp_path / "zero3", *T5, nprocs=2, ds="zero3"))
    assert same_losses(zero3, whole), (zero3, whole)
    assert generate_tool.main([str(stopped), "--prompt", "the"]) == 2  # a decoder's tool refuses it
    assert "span-corruption encoder-decoder" in capsys.readouterr().err
