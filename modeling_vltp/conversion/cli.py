"""What the conversion scripts in `hub/` share: the pruning-plan and dtype arguments, and the one-line refusal."""

import sys

import torch

from ..cli import comma_separated
from ..hub import HubError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_pruning_plan_arguments(parser) -> None:
    """`--prune-layers 16,24 --prune-rates 0.5,0.5`: the pruning plan of the converted encoder."""
    parser.add_argument("--prune-layers", type=comma_separated(int, "16,24"), help="e.g. 16,24 (default: the paper's)")
    parser.add_argument(
        "--prune-rates", type=comma_separated(float, "0.5,0.5"), help="e.g. 0.5,0.5 (default: 0.5 each)"
    )


def run_conversion(convert, *args, description: str, **kwargs) -> int:
    """Run `convert(*args, **kwargs)`, print where the result went, or its refusal in one line; the exit status."""
    try:
        output_dir = convert(*args, **kwargs)
    except (FileNotFoundError, FileExistsError, ValueError, HubError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {description} to {output_dir}")
    return 0
