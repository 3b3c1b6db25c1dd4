"""COCO-Tasks (Sawatzky et al., CVPR 2019): task-driven object selection on COCO 2014 images.

One COCO-format file per task and split, ``task_{N}_{train,test}.json`` (N = 1..14). Every COCO object
of an image is listed with ``category_id`` 1 (preferred for the task, the positive) or 0. Train images
come from COCO ``train2014``, test images from ``val2014``. One sample per (task, image); the target is
the union of the image's preferred objects and is empty when there is none.

The CoTDet re-pack (``coco_task_{split}{N}.json``) is also read: it lists only the preferred objects,
with ``category_id`` set to the 0-based task index, and its ``categories`` are the 14 tasks (ids 0..13);
that list is how it is recognised.
"""

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from string import Formatter

from datasets import Dataset

from .masks import InvalidFieldError, check_box, check_segmentation, encode_mask
from .records import BadRecords, build_dataset, read_json, require, require_image, require_size
from .synthetic import TASK_NAMES as SYNTHETIC_TASK_NAMES

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
# Named sets of task names, so that a config or a command line can say which without knowing the lists.
TASK_NAME_SETS = {"coco_tasks": COCO_TASKS_NAMES, "synthetic": SYNTHETIC_TASK_NAMES}
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


def _image_path(image_root: Path, file_name: str, split: str, allow_outside: bool) -> Path:
    """Where ``file_name`` lies under ``image_root``; an absolute name or one with ``..`` is refused unless
    ``allow_outside``, as it would read outside the image folder."""
    if not allow_outside and (Path(file_name).is_absolute() or ".." in Path(file_name).parts):
        raise InvalidFieldError(
            "file_name",
            f"{file_name!r} points outside the image folder; pass allow_paths_outside_image_dir=True to allow it",
        )
    return image_root / _image_folder(file_name, split) / file_name


def _load_task(file: Path, task: int, sentence: str, image_root: Path, split: str, bad: BadRecords, options: dict):
    """Validated rows of one task file, one per entry of ``images``, in file order. ``options`` holds
    ``check_images`` and ``allow_paths_outside_image_dir`` of [`load_coco_tasks`]."""
    data = read_json(file)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a COCO-Tasks file is a JSON object, got {type(data).__name__}")
    for section in ("images", "annotations"):
        if not isinstance(data.get(section), list):
            raise ValueError(f"{file}: field '{section}': missing or not a list")
    if not data["images"]:
        raise ValueError(f"{file}: field 'images': empty, the file has no samples")
    cotdet = _is_cotdet(data)
    positive_category = task - 1 if cotdet else 1
    allowed_categories = {positive_category} if cotdet else {0, 1}

    images = {}  # image id -> row without the target
    first_entry = {}  # image id -> index of its first entry in 'images'
    broken = set()  # ids of images whose sample is left out
    for index, image in enumerate(data["images"]):
        try:
            if not isinstance(image, dict):
                raise InvalidFieldError("<record>", f"expected a JSON object, got {type(image).__name__}")
            image_id = require(image, "id", int)
            if image_id in first_entry:
                broken.add(image_id)
                raise InvalidFieldError(
                    "id", f"image id {image_id} is also the id of images[{first_entry[image_id]}]: ids must be unique"
                )
            first_entry[image_id] = index
            file_name = require(image, "file_name", str)
            height, width = require_size(image)
            path = _image_path(image_root, file_name, split, options["allow_paths_outside_image_dir"])
            path = require_image(path, "file_name", (height, width) if options["check_images"] else None)
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
            "record": f"{os.path.abspath(file)}: images[{index}]",
        }

    listed_ids = {image.get("id") for image in data["images"] if isinstance(image, dict)}
    positives = defaultdict(list)  # image id -> [(segmentation, box)]
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


def resolve_task_names(names: str | Sequence[str] | None) -> tuple[str, ...]:
    """The `task_names` of [`load_coco_tasks`] from a list of names, the name of a set of [`TASK_NAME_SETS`]
    ("coco_tasks": the official 14, "synthetic": the synthetic world's), or `None` (the official ones)."""
    if names is None:
        return COCO_TASKS_NAMES
    if isinstance(names, str):
        if names not in TASK_NAME_SETS:
            raise ValueError(
                f"task_names: expected a list of names or one of {', '.join(map(repr, TASK_NAME_SETS))}, got {names!r}"
            )
        return TASK_NAME_SETS[names]
    return tuple(names)


def load_coco_tasks(
    annotation_dir,
    image_dir,
    split: str,
    tasks: Sequence[int] | None = None,
    template: str = COCO_TASKS_TEMPLATE,
    skip_bad_records: bool = False,
    task_names: Sequence[str] = COCO_TASKS_NAMES,
    check_images: bool = False,
    allow_paths_outside_image_dir: bool = False,
) -> Dataset:
    """Load COCO-Tasks as a ``datasets.Dataset`` with one row per (task, image), tasks in the order given.

    Args:
        annotation_dir: directory holding ``task_{N}_{split}.json`` (or CoTDet's ``coco_task_{split}{N}.json``).
        image_dir: the COCO 2014 root holding ``train2014/`` and ``val2014/``; the folder follows the
            ``file_name`` prefix (``COCO_train2014_`` / ``COCO_val2014_``), else the split.
        split: ``"train"`` or ``"test"``.
        tasks: task numbers to load (1-based); all tasks of ``task_names`` by default.
        template: the task sentence, with exactly one ``{task}`` field (formatted with the task name).
        skip_bad_records: leave out bad images and the samples of bad annotations instead of raising;
            they are logged as a warning and listed in ``dataset.info.description``.
        task_names: the name of task N at position N - 1; the 14 official names by default (the
            synthetic world passes its own).
        check_images: open every image while loading, so that an unreadable image or one whose size is not the
            annotated one is reported (or skipped) now rather than when its row is read.
        allow_paths_outside_image_dir: accept an image ``file_name`` that is absolute or holds ``..``.

    Raises:
        FileNotFoundError: a task file or an image is missing (message: file, record index, field).
        ValueError: a record is malformed (two images share an id, ...), a file has no images, or no sample is
            left (message: file, record index, field).
    """
    if split not in COCO_TASKS_SPLITS:
        raise ValueError(f"COCO-Tasks split must be one of {COCO_TASKS_SPLITS}, got {split!r}")
    tasks = list(range(1, len(task_names) + 1)) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in range(1, len(task_names) + 1)]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of 1..{len(task_names)}, got {tasks}")
    try:
        fields = [field for _, field, _, _ in Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise ValueError(f"template {template!r}: {error}") from None
    if fields != ["task"]:
        raise ValueError(
            f"template must hold exactly one field, {{task}} ({{{{ and }}}} for literal braces), got {template!r}"
        )

    annotation_dir, image_root = Path(annotation_dir), Path(image_dir)
    files = [_task_file(annotation_dir, task, split) for task in tasks]
    bad = BadRecords(skip_bad_records)
    file_options = {"check_images": check_images, "allow_paths_outside_image_dir": allow_paths_outside_image_dir}
    rows = []
    for task, file in zip(tasks, files):
        sentence = template.format(task=task_names[task - 1])
        rows.extend(_load_task(file, task, sentence, image_root, split, bad, file_options))
    options = {
        "loader": "coco_tasks",
        "split": split,
        "image_dir": str(image_root.resolve()),
        "tasks": tasks,
        "template": template,
        "task_names": list(task_names),
    }
    return build_dataset(rows, files, options, f"COCO-Tasks {split}", bad)
