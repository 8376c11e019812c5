"""Generation with and without the KV cache: tokens/s of greedy decoding of megamu's own model.

    python benchmarks/bench_generate.py [--hidden 128] [--layers 4] [--seq-len 256] [--prompt 16] [--rounds 3]

The cached decoder (megamu.export.decode, as megamu-generate runs it) feeds one new token per step; the
uncached one reruns the full forward over the whole sequence for every token, so its cost grows with
the length. Both are greedy from the same random-init model (shape of configs/tiny.yaml by default,
vocabulary 4096) and must give the same tokens, which this checks. One thread; tokens/s is the median of
`--rounds` runs. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megamu.config import load_config
from megamu.export.sampling import Sampling, generate
from megamu.model import build_model


def uncached_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1, :model.vocab_size].argmax()))
    return ids[len(prompt):]


def timed(run) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.hidden_size={args.hidden}", f"model.n_layers={args.layers}", "model.n_heads=4",
                             "model.n_kv_heads=2", f"model.seq_len={args.seq_len}", "model.vocab_size=4096",
                             f"mup.base_hidden_size={args.hidden}", "mup.zero_readout=false"])
    model = build_model(cfg).eval()
    prompt = torch.randint(0, 4096, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    new = args.seq_len - args.prompt
    rates: dict[str, list[float]] = {"KV cache": [], "full forward per token": []}
    for _ in range(args.rounds):
        cached_s, cached = timed(lambda: generate(model, prompt, Sampling(new, temperature=0), eos_id=None))
        full_s, full = timed(lambda: uncached_greedy(model, prompt, new))
        assert cached == full, "cached and uncached greedy decoding disagree"
        rates["KV cache"].append(new / cached_s)
        rates["full forward per token"].append(new / full_s)
    print(f"{args.prompt}-token prompt, {new} new tokens, hidden {args.hidden}, {args.layers} layers, one thread\n")
    print("| decoding | tokens/s (median) |\n| --- | --- |")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.0f} |")
    speedup = statistics.median(rates["KV cache"]) / statistics.median(rates["full forward per token"])
    print(f"\nKV cache speed-up: {speedup:.1f}x (same tokens)")


if __name__ == "__main__":
    main()
