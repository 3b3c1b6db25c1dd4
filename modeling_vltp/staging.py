"""Writing a folder all at once: conversions and the `[SEG]` cache appear complete or not at all."""

import contextlib
import os
import shutil
import uuid
from pathlib import Path


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike):
    """
    Yield a hidden staging folder next to `output_dir`, renamed to `output_dir` (absent or empty) when the block
    succeeds and removed when it fails, so that a refused, failed or interrupted write leaves no partial output that
    looks complete.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir rather than mkdtemp: the folder gets the permissions the umask gives, as one written in place would.
    staging = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["staged_output"]
