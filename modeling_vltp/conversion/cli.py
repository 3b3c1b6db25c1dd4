"""What the conversion scripts in `hub/` share: list and dtype arguments, and the one-line refusal."""

import sys

import torch

from ..hub import HubError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def comma_separated(cast):
    """An argparse `type` for "16,24"-style lists, each item converted by `cast`."""

    def parse(text: str) -> list:
        return [cast(item) for item in text.split(",") if item.strip()]

    return parse


def run_conversion(convert, *args, description: str, **kwargs) -> int:
    """Run `convert(*args, **kwargs)`, print where the result went, or its refusal in one line; the exit status."""
    try:
        output_dir = convert(*args, **kwargs)
    except (FileNotFoundError, FileExistsError, ValueError, HubError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {description} to {output_dir}")
    return 0
