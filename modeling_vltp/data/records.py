"""Machinery shared by the loaders: the dataset schema, bad-record handling and dataset building."""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, Features, Image, Sequence, Value

from .masks import InvalidFieldError, decode_mask_batch

logger = logging.getLogger(__name__)

# Stored schema. ``mask`` holds the encoded-mask JSON string (see ``masks.py``); the returned datasets
# carry a transform that decodes it to a uint8 array when a sample is read.
FEATURES = Features(
    {
        "image": Image(),
        "task": Value("string"),
        "mask": Value("string"),
        "image_id": Value("int64"),
        "task_id": Value("int64"),
        "boxes": Sequence(Sequence(Value("float32"), length=4)),
        "height": Value("int32"),
        "width": Value("int32"),
    }
)

# Bump when the rows built from the same files change, so cached Arrow files are not reused.
_CACHE_VERSION = 1


class MissingFileError(InvalidFieldError):
    """A file a record points to (an image) does not exist; reported as ``FileNotFoundError``."""


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out by ``skip_bad_records=True``: the annotation file, the record (e.g. ``record 3``,
    ``images[3]``, ``annotations[12]``), the offending field and why."""

    file: str
    record: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: field '{self.field}': {self.reason}"


class BadRecords:
    """Raises on the first bad record, or, when skipping, collects them so the loader can report them."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped: list[SkippedRecord] = []

    def add(self, file: Path, record: str, error: InvalidFieldError) -> None:
        bad = SkippedRecord(str(file), record, error.field, error.reason)
        if not self.skip:
            raise (FileNotFoundError if isinstance(error, MissingFileError) else ValueError)(str(bad)) from None
        self.skipped.append(bad)


def read_json(path: Path):
    """Read an annotation file: ``FileNotFoundError`` if missing, ``ValueError`` if not JSON, naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None


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
    """The record's positive integer ``height`` and ``width``."""
    height, width = require(record, "height", int), require(record, "width", int)
    if height <= 0 or width <= 0:
        raise InvalidFieldError("height" if height <= 0 else "width", f"image size {height}x{width} is not positive")
    return height, width


def require_image(path: Path, field: str) -> str:
    """``path`` as a string if the image exists, else a ``MissingFileError`` for ``field``."""
    if not path.is_file():
        raise MissingFileError(field, f"image file not found: {path}")
    return str(path)


def _yield_rows(rows):
    yield from rows


def build_dataset(rows: list[dict], files: list[Path], options: dict, title: str, bad: BadRecords) -> Dataset:
    """Build the dataset from validated rows, record what was skipped, and attach the mask-decoding transform.

    The cache fingerprint combines the annotation files' size and modification time, the loader
    options and the skipped records, so an edited file or a newly present image is never served stale.
    """
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
