"""Export a megamu run to a Hugging Face transformers model directory.

    megamu-export-hf RUN_DIR OUT_DIR [--tag global_stepN] [--dtype bf16|fp32] [--tokenizer-model M.model]

Llama-arch runs become LlamaForCausalLM (Qwen3ForCausalLM with model.qk_norm), gpt2-arch runs
GPT2LMHeadModel, with μP folded into the weights: the directory loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)`, no remote code.
"""
from __future__ import annotations

from typing import Optional, Sequence

from megamu.cli import ArgumentParser, add_checkpoint_arguments, console_script
from megamu.export.hf import DTYPES, export_run


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("out_dir", help="the model directory to write (created if missing)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weight dtype (default fp32)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="SentencePiece model to export; default: the run's data.tokenizer_model")
    args = parser.parse_args(argv)
    exported = export_run(args.run_dir, args.out_dir, args.tag, args.dtype, args.tokenizer_model)
    print(f"exported {args.run_dir} checkpoint {exported.tag} as {exported.architecture} ({exported.params:,} "
          f"parameters, {exported.dtype}) -> {exported.out_dir}")
    return 0
