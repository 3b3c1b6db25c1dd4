"""Convert a LISA checkpoint (xinlai/LISA-7B-v1's layout, which VLTP finetunes from) into a VLTPForTaskSegmentation
and its VLTPProcessor, with LISA's single-Linear projector, [SEG] id and LLaVA-v1 prompt.

    python hub/convert_lisa.py --input xinlai/LISA-7B-v1 --output-dir OUT
        [--vision-tower openai/clip-vit-large-patch14] [--sam-variant vit_h]
        [--prune-layers 16,24 --prune-rates 0.5,0.5] [--dtype bfloat16]

The result is checked against LISA's own computation (CLIP, projector and LLaMA run separately; SAM with Meta's
segment_anything when installed) before OUT is written; a refused or failed conversion leaves no OUT behind.
"""

import argparse
import sys

from modeling_vltp.conversion import SAM_VARIANTS, convert_lisa
from modeling_vltp.conversion.cli import add_output_arguments, output_options, run_conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="LISA folder or Hub id")
    parser.add_argument("--vision-tower", help="CLIP folder or Hub id when the checkpoint has no vision tower weights")
    parser.add_argument("--sam-variant", choices=SAM_VARIANTS, default="vit_h", help="LISA's SAM (default vit_h)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    return run_conversion(
        convert_lisa,
        args.input,
        args.output_dir,
        description=args.input,
        vision_tower=args.vision_tower,
        sam_variant=args.sam_variant,
        **output_options(args),
    )


if __name__ == "__main__":
    sys.exit(main())
