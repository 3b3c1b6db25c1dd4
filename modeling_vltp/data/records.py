"""Machinery shared by the loaders: the dataset schema, bad-record handling and dataset building."""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, Features, Image, Sequence, Value

from .masks import MAX_IMAGE_SIDE, InvalidFieldError, MissingFileError, decode_mask_batch, open_image, record_error

logger = logging.getLogger(__name__)

# Stored schema. ``image`` holds the image's absolute path and ``mask`` the encoded-mask JSON string (see
# ``masks.py``); the returned datasets carry a transform that opens the one and decodes the other when a sample is
# read. ``record`` names the annotation file and record of the row, for the errors of that transform.
FEATURES = Features(
    {
        "image": Image(decode=False),
        "task": Value("string"),
        "mask": Value("string"),
        "image_id": Value("int64"),
        "task_id": Value("int64"),
        "boxes": Sequence(Sequence(Value("float32"), length=4)),
        "height": Value("int32"),
        "width": Value("int32"),
        "record": Value("string"),
    }
)

# Bump when the rows built from the same files change, so cached Arrow files are not reused.
_CACHE_VERSION = 2


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out by ``skip_bad_records=True``: the annotation file, the record (e.g. ``record 3``,
    ``images[3]``, ``annotations[12]``), the offending field and why."""

    file: str
    record: str
    field: str
    reason: str

    def __str__(self) -> str:
        return str(record_error(f"{self.file}: {self.record}", InvalidFieldError(self.field, self.reason)))


class BadRecords:
    """Raises on the first bad record, or, when skipping, collects them so the loader can report them."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped: list[SkippedRecord] = []

    def add(self, file: Path, record: str, error: InvalidFieldError) -> None:
        if not self.skip:
            raise record_error(f"{file}: {record}", error) from None
        self.skipped.append(SkippedRecord(str(file), record, error.field, error.reason))


def read_json(path: Path):
    """Read an annotation file: ``FileNotFoundError`` if missing, ``ValueError`` if not UTF-8 JSON, naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {error.start}: {error.reason}): annotation files are UTF-8 JSON"
        ) from None


def require(record: dict, field: str, kind: type | tuple, field_path: str | None = None):
    """``record[field]`` if present and of ``kind``, else an ``InvalidFieldError`` naming ``field_path``."""
    name = field_path or field
    if field not in record:
        raise InvalidFieldError(name, "missing")
    value = record[field]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidFieldError(name, f"expected {expected}, got {type(value).__name__} {value!r:.80}")
    return value


def require_size(record: dict) -> tuple[int, int]:
    """The record's ``height`` and ``width``: positive integers of at most ``MAX_IMAGE_SIDE``."""
    height, width = require(record, "height", int), require(record, "width", int)
    if height <= 0 or width <= 0:
        raise InvalidFieldError("height" if height <= 0 else "width", f"image size {height}x{width} is not positive")
    if max(height, width) > MAX_IMAGE_SIDE:
        raise InvalidFieldError(
            "height" if height > MAX_IMAGE_SIDE else "width",
            f"image size {height}x{width} exceeds the limit of {MAX_IMAGE_SIDE} pixels per side",
        )
    return height, width


def require_image(path: Path, field: str, check_size: tuple[int, int] | None = None) -> str:
    """The absolute path of an existing image (so that rows, and their cache, do not depend on the working
    directory), else a ``MissingFileError`` for ``field``. With ``check_size`` (height, width), the image is also
    opened and compared with it (the loaders' ``check_images``)."""
    if not path.is_file():
        raise MissingFileError(field, f"image file not found: {path}")
    if check_size is not None:
        open_image(str(path), *check_size)
    return os.path.abspath(path)


def _yield_rows(rows):
    yield from rows


def build_dataset(rows: list[dict], files: list[Path], options: dict, title: str, bad: BadRecords) -> Dataset:
    """Build the dataset from validated rows, record what was skipped, and attach the mask-decoding transform.

    Raises ``ValueError`` when no row is left, listing the skipped records.

    The cache fingerprint combines the annotation files' size and modification time, the loader
    options and the skipped records, so an edited file or a newly present image is never served stale.
    """
    if not rows:
        if bad.skipped:
            details = "\n".join(str(s) for s in bad.skipped)
            raise ValueError(f"{title}: every record is bad, {len(bad.skipped)} skipped:\n{details}")
        raise ValueError(f"{title}: no records in {', '.join(str(f) for f in files)}")
    key = {
        "version": _CACHE_VERSION,
        "files": [(str(f.resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files],
        "options": options,
        "skipped": [str(s) for s in bad.skipped],
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    dataset = Dataset.from_generator(
        _yield_rows, features=FEATURES, gen_kwargs={"rows": rows}, fingerprint=fingerprint
    )
    description = f"{title}: {len(rows)} samples from {', '.join(str(f) for f in files)}."
    if bad.skipped:
        details = "\n".join(str(s) for s in bad.skipped)
        logger.warning("%s: skipped %d bad record(s):\n%s", title, len(bad.skipped), details)
        description += f"\nSkipped {len(bad.skipped)} bad record(s):\n{details}"
    dataset.info.description = description
    return dataset.with_transform(decode_mask_batch)
