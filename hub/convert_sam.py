"""Convert a Segment Anything checkpoint into VLTP's starting point: a `VLTPSamVisionModel` (SAM's image encoder with a
fresh prune decoder) plus SAM's prompt encoder and mask decoder in OUT/sam_prompt_mask_decoder/.

    python hub/convert_sam.py --source hf --input facebook/sam-vit-huge --output-dir OUT [--prune-layers 16,24
        --prune-rates 0.5,0.5]
    python hub/convert_sam.py --source original --input sam_vit_h_4b8939.pth --variant vit_h --output-dir OUT

The result is checked against the source (transformers' SAM, or Meta's segment_anything when installed) before OUT is
written; a refused or failed conversion leaves no OUT behind.
"""

import argparse
import sys

from modeling_vltp.conversion import SAM_VARIANTS, convert_sam
from modeling_vltp.conversion.cli import add_output_arguments, output_options, run_conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["hf", "original"], required=True, help="the input's layout")
    parser.add_argument("--input", required=True, help="hf: a folder or Hub id; original: Meta's .pth file")
    parser.add_argument("--variant", choices=SAM_VARIANTS, help="required for --source original; checked for hf")
    add_output_arguments(parser, dtype=False)
    args = parser.parse_args(argv)
    if args.source == "original" and args.variant is None:
        parser.error("--source original needs --variant (Meta's checkpoints carry no config)")
    return run_conversion(
        convert_sam,
        args.input,
        args.output_dir,
        description=args.input,
        source=args.source,
        variant=args.variant,
        **output_options(args),
    )


if __name__ == "__main__":
    sys.exit(main())
