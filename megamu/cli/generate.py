"""Generate text from a megamu checkpoint (KV-cache decoding of megamu's own model).

    megamu-generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]
                    [--tag global_stepN] [--tokenizer-model M.model]

Temperature 0 is greedy decoding, which gives the tokens `transformers`' generate gives on the
megamu-export-hf export of the same checkpoint.
"""
from __future__ import annotations

from typing import Optional, Sequence

from megamu.cli import ArgumentParser, add_checkpoint_arguments, console_script
from megamu.data.tokenizer import Tokenizer
from megamu.export.sampling import Sampling, generate
from megamu.export.source import load_run_model, tokenizer_model


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue")
    defaults = Sampling()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy (default 1)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed (default 0)")
    parser.add_argument("--tokenizer-model", default=None, help="default: the run's data.tokenizer_model")
    args = parser.parse_args(argv)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.check()
    cfg, model, _tag = load_run_model(args.run_dir, args.tag)
    tokenizer = Tokenizer(tokenizer_model(cfg, args.run_dir, args.tokenizer_model))
    new = generate(model, tokenizer.encode(args.prompt), sampling, tokenizer.eos_id)
    print(args.prompt + tokenizer.decode(new))
    return 0
