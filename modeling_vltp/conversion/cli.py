"""What the conversion scripts in `hub/` share: the arguments about the converted checkpoint (folder, pruning plan,
dtype) and the one-line refusal."""

import sys

import torch

from ..cli import comma_separated
from ..hub import HubError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_output_arguments(parser, dtype: bool = True) -> None:
    """The converted checkpoint's arguments: `--output-dir`, its pruning plan (`--prune-layers 16,24 --prune-rates
    0.5,0.5`) and, with `dtype`, `--dtype`."""
    parser.add_argument("--output-dir", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--prune-layers", type=comma_separated(int, "16,24"), help="e.g. 16,24 (default: the paper's)")
    parser.add_argument(
        "--prune-rates", type=comma_separated(float, "0.5,0.5"), help="e.g. 0.5,0.5 (default: 0.5 each)"
    )
    if dtype:
        parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")


def output_options(args) -> dict:
    """The converter's keyword arguments from what [`add_output_arguments`] parsed, `--output-dir` aside."""
    options = {"prune_layers": args.prune_layers, "prune_rates": args.prune_rates}
    if "dtype" in vars(args):
        options["dtype"] = DTYPES[args.dtype]
    return options


def run_conversion(convert, *args, description: str, **kwargs) -> int:
    """Run `convert(*args, **kwargs)`, print where the result went, or its refusal in one line; the exit status."""
    try:
        output_dir = convert(*args, **kwargs)
    except (FileNotFoundError, FileExistsError, ValueError, HubError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {description} to {output_dir}")
    return 0
