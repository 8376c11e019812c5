"""Batches prepared by a background loader worker (`data.loader_workers`, the CUDA default) give the same
run as batches prepared in the training process, and a resume continues the data stream exactly although
the worker has drawn batches ahead of the last step."""
from __future__ import annotations

from test_smoke_run import records, train


def _losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in records(run_dir) if r["kind"] == "train"]


def test_a_loader_worker_changes_nothing_and_resumes_exactly(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    for name in ("in_process", "worker", "resumed"):
        (tmp_path / name).mkdir()
    args = (tiny_tokenizer, tiny_dataset_prefix, "train.max_steps=6", "train.eval_iters=0")
    _, in_process = train(tmp_path / "in_process", *args, "data.loader_workers=0")
    _, worker = train(tmp_path / "worker", *args, "data.loader_workers=1")
    assert _losses(worker) == _losses(in_process)

    _, resumed = train(tmp_path / "resumed", *args, "data.loader_workers=1", "train.stop_at_step=3")
    _, resumed = train(tmp_path / "resumed", *args, "data.loader_workers=1", "train.resume=true")
    assert _losses(resumed) == _losses(in_process)
