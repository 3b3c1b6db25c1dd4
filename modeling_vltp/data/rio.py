"""RIO (Qu et al., NeurIPS 2023): intention-oriented segmentation on COCO 2014 images.

Each annotation file (``RIO_{train,common,uncommon}_all_thing.json``) is a JSON list with one record
per (image, intention) sample: ``image_id``, ``height``, ``width``, ``task_id``, ``expressions`` (a
string or a one-element list), ``bbox_list`` (COCO ``[x, y, w, h]``) and ``mask_list`` (one COCO
segmentation per positive instance). The target is the union of ``mask_list``. Train images come from
COCO ``train2014``, the common and uncommon test images from ``val2014``.
"""

import os
from pathlib import Path

from datasets import Dataset

from .masks import InvalidFieldError, check_box, check_segmentation, encode_mask
from .records import BadRecords, build_dataset, read_json, require, require_image, require_size

RIO_SPLITS = ("train", "common", "uncommon")


def _expression(record: dict) -> str:
    expressions = require(record, "expressions", (str, list))
    if isinstance(expressions, list):
        if len(expressions) != 1 or not isinstance(expressions[0], str):
            raise InvalidFieldError(
                "expressions", f"expected a string or a one-element list of strings, got {expressions!r:.80}"
            )
        expressions = expressions[0]
    if not expressions.strip():
        raise InvalidFieldError("expressions", "the intention sentence is empty")
    return expressions


def _rio_row(record, image_folder: Path, coco_folder: str, check_images: bool) -> dict:
    if not isinstance(record, dict):
        raise InvalidFieldError("<record>", f"expected a JSON object, got {type(record).__name__}")
    image_id = require(record, "image_id", int)
    height, width = require_size(record)
    task_id = require(record, "task_id", int)
    task = _expression(record)
    boxes = [
        check_box(box, height, width, f"bbox_list[{i}]") for i, box in enumerate(require(record, "bbox_list", list))
    ]
    segmentations = require(record, "mask_list", list)
    for i, segmentation in enumerate(segmentations):
        check_segmentation(segmentation, height, width, f"mask_list[{i}]")
    image_file = image_folder / f"COCO_{coco_folder}_{image_id:012d}.jpg"
    image = require_image(image_file, "image_id", (height, width) if check_images else None)
    return {
        "image": image,
        "task": task,
        "mask": encode_mask(segmentations, height, width),
        "image_id": image_id,
        "task_id": task_id,
        "boxes": boxes,
        "height": height,
        "width": width,
    }


def load_rio(
    annotation_path, image_dir, split: str, skip_bad_records: bool = False, check_images: bool = False
) -> Dataset:
    """Load one RIO split as a ``datasets.Dataset`` (one row per record; schema in ``docs/data.md``).

    Args:
        annotation_path: the split's JSON file, or the directory holding ``RIO_{split}_all_thing.json``.
        image_dir: the COCO 2014 root holding ``train2014/`` (train split) and ``val2014/`` (common, uncommon).
        split: ``"train"``, ``"common"`` or ``"uncommon"``.
        skip_bad_records: leave out records with a missing or malformed field or a missing image instead
            of raising; they are logged as a warning and listed in ``dataset.info.description``.
        check_images: open every image while loading, so that an unreadable image or one whose size is not the
            annotated one is reported (or skipped) now rather than when its row is read.

    Raises:
        FileNotFoundError: the annotation file or an image is missing (message: file, record index, field).
        ValueError: a record is malformed, or no record is left (message: file, record index, field).
    """
    if split not in RIO_SPLITS:
        raise ValueError(f"RIO split must be one of {RIO_SPLITS}, got {split!r}")
    annotation_file = Path(annotation_path)
    if annotation_file.is_dir():
        annotation_file = annotation_file / f"RIO_{split}_all_thing.json"
    records = read_json(annotation_file)
    if not isinstance(records, list):
        raise ValueError(
            f"{annotation_file}: a RIO annotation file is a JSON list of records, got {type(records).__name__}"
        )

    coco_folder = "train2014" if split == "train" else "val2014"
    image_folder = Path(image_dir) / coco_folder
    bad = BadRecords(skip_bad_records)
    rows = []
    for index, record in enumerate(records):
        try:
            row = _rio_row(record, image_folder, coco_folder, check_images)
        except InvalidFieldError as error:
            bad.add(annotation_file, f"record {index}", error)
            continue
        rows.append({**row, "record": f"{os.path.abspath(annotation_file)}: record {index}"})
    options = {"loader": "rio", "split": split, "image_dir": str(Path(image_dir).resolve())}
    return build_dataset(rows, [annotation_file], options, f"RIO {split}", bad)
