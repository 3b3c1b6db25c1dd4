"""Build an untrained VLTPForTaskSegmentation (and its VLTPProcessor) from a transformers LLaVA checkpoint and a SAM
checkpoint, with [SEG] added to the tokenizer.

    python hub/convert_vltp.py --llava llava-hf/llava-1.5-7b-hf --sam facebook/sam-vit-huge --output-dir OUT
        [--prune-layers 16,24 --prune-rates 0.5,0.5] [--dtype bfloat16]

--sam also takes the output of hub/convert_sam.py (its prune decoder is then kept). The result is checked against
both sources before OUT is written; a refused or failed conversion leaves no OUT behind.
"""

import argparse
import sys

from modeling_vltp.conversion import convert_vltp
from modeling_vltp.conversion.cli import add_output_arguments, output_options, run_conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llava", required=True, help="folder or Hub id in llava-hf/llava-1.5-7b-hf's layout")
    parser.add_argument("--sam", required=True, help="folder or Hub id of transformers' SAM, or convert_sam's output")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    return run_conversion(
        convert_vltp,
        args.llava,
        args.sam,
        args.output_dir,
        description=f"{args.llava} and {args.sam}",
        **output_options(args),
    )


if __name__ == "__main__":
    sys.exit(main())
