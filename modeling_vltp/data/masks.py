"""COCO segmentations (polygons, uncompressed and compressed RLE): validation, and the lazy decoding of rows.

The loaders keep each sample's target as a small JSON string, the *encoded mask*::

    {"size": [height, width], "segmentations": [<COCO segmentation>, ...]}

and decode it to a binary array only when the sample is read (:func:`decode_mask`), so building a
50,000-sample dataset never rasterises a mask. The target is the union of the listed segmentations;
an empty list is an empty (all-zero) target. The row's image is opened at the same time
(:func:`open_image`), checked against the annotated size.
"""

import io
import json
import math
from numbers import Real

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..processing_vltp import load_image

# Largest annotated height or width accepted. A mask is decoded to height x width bytes (an 8192 x 8192 one takes
# 64 MB and about 3 s in pycocotools); far larger sizes exhaust memory, hang or crash pycocotools.
MAX_IMAGE_SIDE = 8192

# COCO coordinates may touch the image border (x == width) and some annotation tools round
# outward, so coordinates up to one pixel outside the image are accepted.
BORDER_TOLERANCE = 1.0


class InvalidFieldError(ValueError):
    """A field of one annotation record is missing or malformed; the loaders add the file and the record index."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field '{field}': {reason}")
        self.field = field
        self.reason = reason


class MissingFileError(InvalidFieldError):
    """A file a record points to (an image) does not exist; reported as ``FileNotFoundError``."""


def record_error(source: str, error: InvalidFieldError) -> Exception:
    """The exception reporting ``error`` of the record ``source`` (``<file>: <record>``), as
    ``<file>: <record>: field '<field>': <reason>``: ``FileNotFoundError`` for a missing file, else ``ValueError``."""
    return (FileNotFoundError if isinstance(error, MissingFileError) else ValueError)(f"{source}: {error}")


def open_image(path: str, height: int, width: int, data: bytes | None = None) -> Image.Image:
    """The record's image as RGB (see ``load_image``), or an ``InvalidFieldError`` if it cannot be read or its size
    is not the annotated ``height`` x ``width``. ``data`` holds the file's bytes when a saved dataset embedded them
    (``save_to_disk`` does; ``path`` is then only the file name)."""
    file = path
    if data is not None:
        file = io.BytesIO(data)
        file.name = path
    try:
        image = load_image(file)
    except FileNotFoundError as error:
        raise MissingFileError("image", str(error)) from None
    except ValueError as error:
        raise InvalidFieldError("image", str(error)) from None
    if (image.height, image.width) != (height, width):
        raise InvalidFieldError(
            "height" if image.height != height else "width",
            f"annotated size {height}x{width} (height x width) but the image {path} is {image.height}x{image.width} "
            "(after its EXIF orientation)",
        )
    return image


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_inside(xs, ys, height: int, width: int, field: str) -> None:
    if min(xs) < -BORDER_TOLERANCE or max(xs) > width + BORDER_TOLERANCE:
        raise InvalidFieldError(field, f"x coordinates {min(xs)}..{max(xs)} lie outside the image width {width}")
    if min(ys) < -BORDER_TOLERANCE or max(ys) > height + BORDER_TOLERANCE:
        raise InvalidFieldError(field, f"y coordinates {min(ys)}..{max(ys)} lie outside the image height {height}")


def check_box(box, height: int, width: int, field: str) -> list[float]:
    """Validate a COCO ``[x, y, w, h]`` box against the image size and return it as floats."""
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise InvalidFieldError(field, f"expected a box [x, y, w, h] of 4 finite numbers, got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
        raise InvalidFieldError(field, f"box {box} has a negative width or height")
    _check_inside([x, x + w], [y, y + h], height, width, field)
    return [x, y, w, h]


def rle_string_to_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the inverse of pycocotools' ``rleToString``).

    Raises ``ValueError`` on characters outside the encoding's alphabet or a truncated value; used to
    validate compressed RLE before pycocotools decodes it (it does not check the run lengths itself).
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise ValueError("the string ends inside a run length")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {counts[position]!r} is not part of the RLE alphabet")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_polygons(polygons: list, height: int, width: int, field: str) -> None:
    if not polygons:
        raise InvalidFieldError(field, "an empty polygon list")
    for i, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
            raise InvalidFieldError(field, f"polygon {i} is not a flat list of finite numbers [x1, y1, x2, y2, ...]")
        if len(polygon) < 6 or len(polygon) % 2:
            raise InvalidFieldError(
                field, f"polygon {i} has {len(polygon)} coordinates; a polygon needs an even number, at least 6"
            )
        _check_inside(polygon[0::2], polygon[1::2], height, width, field)


def _check_rle(rle: dict, height: int, width: int, field: str) -> None:
    if not {"size", "counts"} <= set(rle):
        raise InvalidFieldError(field, f"an RLE needs the keys 'size' and 'counts', got {sorted(rle)}")
    if rle["size"] != [height, width]:
        raise InvalidFieldError(field, f"RLE size {rle['size']} does not match the image size [{height}, {width}]")
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            runs = rle_string_to_counts(counts)
        except ValueError as error:
            raise InvalidFieldError(field, f"malformed compressed RLE counts: {error}") from None
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        runs = counts
    else:
        raise InvalidFieldError(field, "RLE counts must be a string (compressed) or a list of integers (uncompressed)")
    if any(run < 0 for run in runs) or sum(runs) != height * width:
        raise InvalidFieldError(
            field, f"RLE run lengths must be non-negative and cover {height}x{width} = {height * width} pixels"
        )


def check_segmentation(segmentation, height: int, width: int, field: str) -> None:
    """Validate one COCO segmentation (polygon list or RLE dict) against the image size, without decoding it."""
    if isinstance(segmentation, list):
        _check_polygons(segmentation, height, width, field)
    elif isinstance(segmentation, dict):
        _check_rle(segmentation, height, width, field)
    else:
        raise InvalidFieldError(field, f"expected a polygon list or an RLE dict, got {type(segmentation).__name__}")


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """Convert a validated COCO segmentation to one pycocotools RLE (an instance's polygons are merged)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": [height, width], "counts": segmentation["counts"].encode("ascii")}


def encode_mask(segmentations: list, height: int, width: int) -> str:
    """The encoded-mask JSON string the datasets store for a target made of ``segmentations``."""
    return json.dumps({"size": [height, width], "segmentations": segmentations}, separators=(",", ":"))


def has_target(encoded: str) -> bool:
    """Whether an encoded-mask string lists any segmentation (an empty list: nothing in the image fits the task)."""
    return bool(json.loads(encoded)["segmentations"])


def decode_mask(encoded: str) -> np.ndarray:
    """Decode an encoded-mask string to a ``(height, width)`` ``uint8`` array of 0 and 1 (union of the instances)."""
    data = json.loads(encoded)
    height, width = data["size"]
    if not data["segmentations"]:
        return np.zeros((height, width), dtype=np.uint8)
    rles = [segmentation_to_rle(s, height, width) for s in data["segmentations"]]
    return np.ascontiguousarray(mask_utils.decode(mask_utils.merge(rles, intersect=False)))


def decode_mask_batch(batch: dict) -> dict:
    """``Dataset.set_transform`` function of the loaders' rows: decodes the encoded ``mask`` column to ``uint8`` arrays
    and opens the ``image`` column (stored undecoded) with :func:`open_image`, raising an error that names the
    annotation file, the record and the field when an image cannot be read or does not have the annotated size."""
    if "mask" in batch:
        batch["mask"] = [decode_mask(encoded) for encoded in batch["mask"]]
    if "image" in batch:
        images = []
        for image, height, width, source in zip(batch["image"], batch["height"], batch["width"], batch["record"]):
            try:
                images.append(open_image(image["path"], height, width, image["bytes"]))
            except InvalidFieldError as error:
                raise record_error(source, error) from None
        batch["image"] = images
    return batch
