"""COCO-Tasks (Sawatzky et al., CVPR 2019): task-driven object selection on COCO 2014 images.

One COCO-format file per task and split, ``task_{N}_{train,test}.json`` (N = 1..14). Every COCO object
of an image is listed with ``category_id`` 1 (preferred for the task, the positive) or 0. Train images
come from COCO ``train2014``, test images from ``val2014``. One sample per (task, image); the target is
the union of the image's preferred objects and is empty when there is none.

The CoTDet re-pack (``coco_task_{split}{N}.json``) is also read: it lists only the preferred objects,
with ``category_id`` set to the 0-based task index, and its ``categories`` are the 14 tasks (ids 0..13);
that list is how it is recognised.
"""

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset

from .masks import InvalidFieldError, check_box, check_segmentation, encode_mask
from .records import BadRecords, build_dataset, read_json, require, require_image, require_size

# Task names in the official order (task N is COCO_TASKS_NAMES[N - 1]), as VLTP words them.
COCO_TASKS_NAMES = (
    "step on",
    "sit comfortably",
    "place flowers",
    "get potatoes out of fire",
    "water plant",
    "get lemon out of tea",
    "dig hole",
    "open bottle of beer",
    "open parcel",
    "serve wine",
    "pour sugar",
    "smear butter",
    "extinguish fire",
    "pound carpet",
)
COCO_TASKS_TEMPLATE = "you can use the thing to {task}"
COCO_TASKS_SPLITS = ("train", "test")
_SPLIT_FOLDERS = {"train": "train2014", "test": "val2014"}


def _task_file(annotation_dir: Path, task: int, split: str) -> Path:
    official = annotation_dir / f"task_{task}_{split}.json"
    cotdet = annotation_dir / f"coco_task_{split}{task}.json"
    if not official.is_file() and cotdet.is_file():
        return cotdet
    return official


def _is_cotdet(data: dict) -> bool:
    categories = data.get("categories")
    if not isinstance(categories, list) or not all(isinstance(c, dict) for c in categories):
        return False
    return sorted(c.get("id", -1) for c in categories) == list(range(len(COCO_TASKS_NAMES)))


def _image_folder(file_name: str, split: str) -> str:
    for folder in _SPLIT_FOLDERS.values():
        if file_name.startswith(f"COCO_{folder}_"):
            return folder
    return _SPLIT_FOLDERS[split]


def _load_task(file: Path, task: int, sentence: str, image_root: Path, split: str, bad: BadRecords) -> list[dict]:
    """Validated rows of one task file, one per entry of ``images``, in file order."""
    data = read_json(file)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a COCO-Tasks file is a JSON object, got {type(data).__name__}")
    for section in ("images", "annotations"):
        if not isinstance(data.get(section), list):
            raise ValueError(f"{file}: field '{section}': missing or not a list")
    cotdet = _is_cotdet(data)
    positive_category = task - 1 if cotdet else 1
    allowed_categories = {positive_category} if cotdet else {0, 1}

    images = {}  # image id -> row without the target
    for index, image in enumerate(data["images"]):
        try:
            if not isinstance(image, dict):
                raise InvalidFieldError("<record>", f"expected a JSON object, got {type(image).__name__}")
            image_id = require(image, "id", int)
            file_name = require(image, "file_name", str)
            height, width = require_size(image)
            path = require_image(image_root / _image_folder(file_name, split) / file_name, "file_name")
        except InvalidFieldError as error:
            bad.add(file, f"images[{index}]", error)
            continue
        images[image_id] = {
            "image": path,
            "task": sentence,
            "image_id": image_id,
            "task_id": task,
            "height": height,
            "width": width,
        }

    listed_ids = {image.get("id") for image in data["images"] if isinstance(image, dict)}
    positives = defaultdict(list)  # image id -> [(segmentation, box)]
    broken = set()
    for index, annotation in enumerate(data["annotations"]):
        image_id = None
        try:
            if not isinstance(annotation, dict):
                raise InvalidFieldError("<record>", f"expected a JSON object, got {type(annotation).__name__}")
            image_id = require(annotation, "image_id", int)
            category = require(annotation, "category_id", int)
            if category not in allowed_categories:
                raise InvalidFieldError("category_id", f"expected one of {sorted(allowed_categories)}, got {category}")
            if image_id not in listed_ids:
                raise InvalidFieldError("image_id", f"no entry of 'images' has id {image_id}")
            if image_id not in images:
                continue  # the image entry itself is bad and already reported
            if category != positive_category:
                continue
            height, width = images[image_id]["height"], images[image_id]["width"]
            segmentation = require(annotation, "segmentation", (list, dict))
            check_segmentation(segmentation, height, width, "segmentation")
            box = check_box(require(annotation, "bbox", list), height, width, "bbox")
        except InvalidFieldError as error:
            if image_id in images:
                error = InvalidFieldError(error.field, f"{error.reason} (sample of image {image_id})")
                broken.add(image_id)
            bad.add(file, f"annotations[{index}]", error)
            continue
        positives[image_id].append((segmentation, box))

    rows = []
    for image_id, row in images.items():
        if image_id in broken:
            continue
        instances = positives[image_id]
        row["mask"] = encode_mask([s for s, _ in instances], row["height"], row["width"])
        row["boxes"] = [b for _, b in instances]
        rows.append(row)
    return rows


def load_coco_tasks(
    annotation_dir,
    image_dir,
    split: str,
    tasks: Sequence[int] | None = None,
    template: str = COCO_TASKS_TEMPLATE,
    skip_bad_records: bool = False,
    task_names: Sequence[str] = COCO_TASKS_NAMES,
) -> Dataset:
    """Load COCO-Tasks as a ``datasets.Dataset`` with one row per (task, image), tasks in the order given.

    Args:
        annotation_dir: directory holding ``task_{N}_{split}.json`` (or CoTDet's ``coco_task_{split}{N}.json``).
        image_dir: the COCO 2014 root holding ``train2014/`` and ``val2014/``; the folder follows the
            ``file_name`` prefix (``COCO_train2014_`` / ``COCO_val2014_``), else the split.
        split: ``"train"`` or ``"test"``.
        tasks: task numbers to load (1-based); all tasks of ``task_names`` by default.
        template: the task sentence, formatted with ``task=<task name>``.
        skip_bad_records: leave out bad images and the samples of bad annotations instead of raising;
            they are logged as a warning and listed in ``dataset.info.description``.
        task_names: the name of task N at position N - 1; the 14 official names by default (the
            synthetic world passes its own).

    Raises:
        FileNotFoundError: a task file or an image is missing (message: file, record index, field).
        ValueError: a record is malformed (message: file, record index, field).
    """
    if split not in COCO_TASKS_SPLITS:
        raise ValueError(f"COCO-Tasks split must be one of {COCO_TASKS_SPLITS}, got {split!r}")
    tasks = list(range(1, len(task_names) + 1)) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in range(1, len(task_names) + 1)]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of 1..{len(task_names)}, got {tasks}")
    if "{task}" not in template:
        raise ValueError(f"template must contain '{{task}}', got {template!r}")

    annotation_dir, image_root = Path(annotation_dir), Path(image_dir)
    files = [_task_file(annotation_dir, task, split) for task in tasks]
    bad = BadRecords(skip_bad_records)
    rows = []
    for task, file in zip(tasks, files):
        sentence = template.format(task=task_names[task - 1])
        rows.extend(_load_task(file, task, sentence, image_root, split, bad))
    options = {
        "loader": "coco_tasks",
        "split": split,
        "image_dir": str(image_root.resolve()),
        "tasks": tasks,
        "template": template,
        "task_names": list(task_names),
    }
    return build_dataset(rows, files, options, f"COCO-Tasks {split}", bad)
