"""A procedurally generated task-oriented segmentation world, written as RIO or COCO-Tasks files.

Each image is a scene of 2 to 5 objects over a varied background (plain, gradient, noise or grid).
An object has a shape, a colour, a size and a texture; later objects may partly hide earlier ones.
A task is answered by every object having one *trait*, so one image answers different tasks with
different objects (the paper's Fig. 1c) and some tasks have no answer in an image (empty target):

====  ==========================  ==========  ===============================================
 N    task (COCO-Tasks name)      trait       objects that answer it
====  ==========================  ==========  ===============================================
 1    roll across the floor       round       circle, ring
 2    build a stable tower        flat-sided  square, hexagon
 3    thread a rope through       hollow      ring
 4    poke a hole in paper        pointed     triangle, star, diamond
 5    decorate a christmas tree   star        star
 6    warn others of danger       red         red objects
 7    hide in the grass           green       green objects
 8    light up a dark room        yellow      yellow objects
 9    paint the sky               blue        blue objects
 10   wrap a present              patterned   striped or dotted objects
 11   cover a large hole          large       large objects
 12   carry in a small pocket     small       small objects
====  ==========================  ==========  ===============================================

Shapes: circle, ring, square, triangle, star, hexagon, diamond. Colours: red, green, blue, yellow,
purple, orange. Textures: solid, striped, dotted. Sizes: small, large. ``TASKS`` holds the table
with each task's RIO-style sentences.

Held-out evaluation splits (``holdout``) measure generalisation; the evaluation split is ``"uncommon"``
(RIO format) or ``"test"`` (COCO-Tasks format):

* ``"phrasing"`` (RIO format only): every task has sentences seen in ``"train"`` and ``"common"`` and
  one held-out sentence used only in ``"uncommon"``.
* ``"objects"``: hexagons and diamonds never appear in ``"train"`` and ``"common"``; every evaluation
  image contains at least one. Their traits (flat-sided, pointed) are known from other shapes.

Images are COCO-2014-named JPEGs (``train2014/COCO_train2014_%012d.jpg`` for train, ``val2014/`` for
the other splits). Each object's region comes from its polygons rasterised by pycocotools, and the
image is painted from exactly that raster, so drawing and annotation agree pixel for pixel (up to
JPEG compression). An object that nothing hides is annotated with its polygons; a partly hidden one
with the RLE of its visible part (compressed in RIO files, uncompressed in COCO-Tasks files), so
both encodings are exercised. Output is deterministic for a seed and split.

Command line: ``python -m modeling_vltp.data.synthetic --out DIR --num-images N --format rio``.
"""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


@dataclass(frozen=True)
class Task:
    """One task of the world: objects with ``trait`` answer it."""

    name: str
    trait: str
    phrasings: tuple[str, ...]
    heldout_phrasings: tuple[str, ...]


TASKS = (
    Task(
        "roll across the floor",
        "round",
        ("you can use the thing to roll across the floor.", "you can roll the thing down a gentle slope."),
        ("you can give the thing a push and watch it roll away.",),
    ),
    Task(
        "build a stable tower",
        "flat-sided",
        ("you can use the thing to build a stable tower.", "you can stack the thing on top of another one."),
        ("you can pile the thing up without it toppling over.",),
    ),
    Task(
        "thread a rope through",
        "hollow",
        ("you can use the thing to thread a rope through.", "you can pass a string through the hole of the thing."),
        ("you can hang the thing on a hook.",),
    ),
    Task(
        "poke a hole in paper",
        "pointed",
        ("you can use the thing to poke a hole in paper.", "you can prick a balloon with the thing."),
        ("you can scratch a mark into wood with the tip of the thing.",),
    ),
    Task(
        "decorate a christmas tree",
        "star",
        ("you can use the thing to decorate a christmas tree.", "you can put the thing on top of the tree."),
        ("you can hang the thing up as a festive ornament.",),
    ),
    Task(
        "warn others of danger",
        "red",
        ("you can use the thing to warn others of danger.", "you can hold up the thing to signal stop."),
        ("you can wave the thing to tell drivers to halt.",),
    ),
    Task(
        "hide in the grass",
        "green",
        ("you can use the thing to hide in the grass.", "you can put the thing among leaves where nobody spots it."),
        ("you can camouflage the thing in a hedge.",),
    ),
    Task(
        "light up a dark room",
        "yellow",
        ("you can use the thing to light up a dark room.", "you can hang the thing up to look like the sun."),
        ("you can use the thing to brighten a gloomy corner.",),
    ),
    Task(
        "paint the sky",
        "blue",
        ("you can use the thing to paint the sky.", "you can use the thing to colour the sea in a drawing."),
        ("you can use the thing to draw a calm lake.",),
    ),
    Task(
        "wrap a present",
        "patterned",
        ("you can use the thing to wrap a present.", "you can use the thing as festive gift paper."),
        ("you can cover a birthday box with the thing.",),
    ),
    Task(
        "cover a large hole",
        "large",
        ("you can use the thing to cover a large hole.", "you can use the thing to shade a whole flower bed."),
        ("you can lay the thing over a big gap in the fence.",),
    ),
    Task(
        "carry in a small pocket",
        "small",
        ("you can use the thing to carry in a small pocket.", "you can carry the thing in your pocket all day."),
        ("you can tuck the thing into a tiny purse.",),
    ),
)
# Names for ``load_coco_tasks(..., task_names=TASK_NAMES)``: task N is TASK_NAMES[N - 1].
TASK_NAMES = tuple(task.name for task in TASKS)
# The index in TASKS of the task each of the world's sentences (phrasings and held-out phrasings) asks for.
TASK_OF_SENTENCE = {
    sentence: index for index, task in enumerate(TASKS) for sentence in (*task.phrasings, *task.heldout_phrasings)
}

SHAPE_TRAITS = {
    "circle": ("round",),
    "ring": ("round", "hollow"),
    "square": ("flat-sided",),
    "triangle": ("pointed",),
    "star": ("pointed", "star"),
    "hexagon": ("flat-sided",),
    "diamond": ("pointed",),
}
HELDOUT_SHAPES = ("hexagon", "diamond")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
}
TEXTURES = ("solid", "striped", "dotted")
# Circumradius as a fraction of the image side.
SIZES = {"small": (0.07, 0.11), "large": (0.16, 0.22)}
BACKGROUNDS = ("plain", "gradient", "noise", "grid")

SPLITS = {"rio": ("train", "common", "uncommon"), "coco_tasks": ("train", "test")}
_SPLIT_INDEX = {"train": 0, "common": 1, "uncommon": 2, "test": 3}
_EVALUATION_SPLITS = ("uncommon", "test")
_MAX_IMAGE_SIZE = 2048  # a synthetic scene needs no more; far larger sizes exhaust memory
_MAX_IMAGES = 100_000  # image ids of split s are s * _MAX_IMAGES + 1, ...
_MIN_VISIBLE_FRACTION = 0.5  # a new object may hide at most half of any earlier one


@dataclass(frozen=True)
class SceneObject:
    """An object of a scene; ``polygons`` are its COCO polygons (full extent, before occlusion)."""

    shape: str
    colour: str
    size: str
    texture: str
    polygons: tuple[tuple[float, ...], ...]

    @property
    def traits(self) -> frozenset:
        patterned = ("patterned",) if self.texture != "solid" else ()
        return frozenset((self.shape, *SHAPE_TRAITS[self.shape], self.colour, self.size, self.texture, *patterned))


@dataclass(frozen=True)
class Scene:
    """One generated image; ``objects`` are listed bottom to top (later ones hide earlier ones)."""

    image_id: int
    path: Path
    background: str
    objects: tuple[SceneObject, ...]


def _shape_polygons(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[list[float]]:
    """COCO polygons of a shape; a ring is two half annuli, since a COCO polygon has no holes."""

    def ring_of(radii, start=0.0, span=2 * math.pi, closed=True):
        count = len(radii)
        step = span / count if closed else span / (count - 1)
        return [
            (cx + r * math.cos(angle + start + k * step), cy + r * math.sin(angle + start + k * step))
            for k, r in enumerate(radii)
        ]

    if shape == "ring":
        halves = []
        for start in (0.0, math.pi):
            outer = ring_of([radius] * 17, start, math.pi, closed=False)
            inner = ring_of([0.5 * radius] * 17, start, math.pi, closed=False)[::-1]
            halves.append(outer + inner)
        points = halves
    else:
        radii = {
            "circle": [radius] * 32,
            "square": [radius] * 4,
            "triangle": [radius] * 3,
            "star": [radius, 0.45 * radius] * 5,
            "hexagon": [radius] * 6,
            "diamond": [radius, 0.55 * radius] * 2,
        }[shape]
        points = [ring_of(radii)]
    return [[round(v, 2) for point in polygon for v in point] for polygon in points]


def _rasterise(polygons, size: int) -> np.ndarray:
    rles = mask_utils.frPyObjects([list(p) for p in polygons], size, size)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = rng.uniform(150, 230) + rng.uniform(-15, 15, 3)  # muted, so object colours stand out
    canvas = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    if kind == "gradient":
        other = rng.uniform(110, 200) + rng.uniform(-15, 15, 3)
        canvas = canvas + np.linspace(0, 1, size)[:, None, None] * (other - base)
    elif kind == "noise":
        canvas = canvas + rng.normal(0, 10, (size, size, 3))
    elif kind == "grid":
        canvas = canvas.copy()
        canvas[::16] -= 40
        canvas[:, ::16] -= 40
    return kind, canvas


def _paint(canvas: np.ndarray, region: np.ndarray, obj: SceneObject, rng: np.random.Generator) -> None:
    colour = np.array(COLOURS[obj.colour], dtype=np.float64)
    size = canvas.shape[0]
    ys, xs = np.mgrid[0:size, 0:size]
    texture = np.broadcast_to(colour, canvas.shape).copy()
    if obj.texture == "striped":
        direction = rng.uniform(0, math.pi)
        stripes = ((xs * math.cos(direction) + ys * math.sin(direction)) // 3).astype(int) % 2 == 1
        texture[stripes] = 0.5 * colour
    elif obj.texture == "dotted":
        dots = (xs % 5 < 2) & (ys % 5 < 2)
        texture[dots] = 255.0
    canvas[region] = texture[region]


def _place_objects(rng: np.random.Generator, size: int, shapes: tuple, first_shapes: tuple):
    """Sample 2 to 5 objects with their full rasters; a placement that would hide too much of an earlier
    object is retried and, after 30 tries, the object is dropped."""
    objects, rasters = [], []
    for index in range(rng.integers(2, 6)):
        pool = first_shapes if index == 0 else shapes
        shape = pool[rng.integers(len(pool))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size_name = list(SIZES)[rng.integers(len(SIZES))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        radius = rng.uniform(*SIZES[size_name]) * size
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(30):
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            polygons = _shape_polygons(shape, cx, cy, radius, angle)
            raster = _rasterise(polygons, size)
            visible = [r & ~np.logical_or.reduce([*rasters[i + 1 :], raster]) for i, r in enumerate(rasters)]
            if all(v.sum() >= _MIN_VISIBLE_FRACTION * r.sum() for v, r in zip(visible, rasters)):
                objects.append(SceneObject(shape, colour, size_name, texture, tuple(tuple(p) for p in polygons)))
                rasters.append(raster)
                break
    return objects, rasters


def _visible_regions(rasters: list) -> list:
    covered = np.zeros_like(rasters[0])
    visible = []
    for raster in reversed(rasters):
        visible.append(raster & ~covered)
        covered = covered | raster
    return visible[::-1]


def _uncompressed_rle(region: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = region.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": list(region.shape), "counts": runs}


def _annotation(obj: SceneObject, full: np.ndarray, visible: np.ndarray, compressed: bool) -> dict:
    """Segmentation, box and area of an object: its polygons if nothing hides it, else its visible RLE."""
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    if (visible == full).all():
        segmentation = [list(p) for p in obj.polygons]
    elif compressed:
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = _uncompressed_rle(visible)
    box = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
    return {"segmentation": segmentation, "bbox": box, "area": int(mask_utils.area(rle))}


def _check_arguments(
    num_images: int, seed: int, image_size: int, format: str, split: str, holdout, tasks_per_image: int
) -> None:
    """Refuses bad arguments of [`generate`] before anything is written."""
    if format not in SPLITS:
        raise ValueError(f"format must be one of {tuple(SPLITS)}, got {format!r}")
    if split not in SPLITS[format]:
        raise ValueError(f"split of the {format} format must be one of {SPLITS[format]}, got {split!r}")
    if holdout not in (None, "phrasing", "objects"):
        raise ValueError(f"holdout must be None, 'phrasing' or 'objects', got {holdout!r}")
    if holdout == "phrasing" and format != "rio":
        raise ValueError("holdout='phrasing' needs format='rio': COCO-Tasks sentences come from one template")
    if not 1 <= num_images < _MAX_IMAGES:
        raise ValueError(f"num_images must be in 1..{_MAX_IMAGES - 1}, got {num_images}")
    if not 32 <= image_size <= _MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be in 32..{_MAX_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not 1 <= tasks_per_image <= len(TASKS):
        raise ValueError(f"tasks_per_image must be in 1..{len(TASKS)}, got {tasks_per_image}")


def generate(
    out_dir,
    num_images: int,
    seed: int = 0,
    image_size: int = 128,
    format: str = "rio",
    split: str = "train",
    holdout: str | None = None,
    tasks_per_image: int = 3,
) -> list[Scene]:
    """Draw ``num_images`` scenes and write them with their annotations under ``out_dir``.

    Args:
        out_dir: output root; it receives ``train2014/`` or ``val2014/`` and the annotation file(s):
            ``RIO_{split}_all_thing.json`` (format ``"rio"``) or ``task_{N}_{split}.json`` for every task
            N of ``TASKS`` (format ``"coco_tasks"``). Read back with ``load_rio(out_dir, out_dir, split)``
            or ``load_coco_tasks(out_dir, out_dir, split, task_names=TASK_NAMES)``.
        num_images: number of images.
        seed: random seed; the same seed, split and arguments give identical files.
        image_size: side of the square images, in pixels (32 to 2048).
        format: ``"rio"`` or ``"coco_tasks"``.
        split: ``"train"``, ``"common"`` or ``"uncommon"`` (RIO); ``"train"`` or ``"test"`` (COCO-Tasks).
        holdout: ``None``, ``"phrasing"`` or ``"objects"``: what the evaluation split holds out (module docstring).
        tasks_per_image: RIO format: how many distinct tasks (records) each image gets. COCO-Tasks files
            pair every image with every task, as the official files do.

    Returns:
        The scenes, in image-id order.
    """
    _check_arguments(num_images, seed, image_size, format, split, holdout, tasks_per_image)
    evaluation = split in _EVALUATION_SPLITS
    shapes = tuple(s for s in SHAPE_TRAITS if holdout != "objects" or evaluation or s not in HELDOUT_SHAPES)
    first_shapes = HELDOUT_SHAPES if holdout == "objects" and evaluation else shapes
    folder = "train2014" if split == "train" else "val2014"
    out_dir = Path(out_dir)
    (out_dir / folder).mkdir(parents=True, exist_ok=True)
    scene_rng = np.random.default_rng([seed, _SPLIT_INDEX[split], 0])
    task_rng = np.random.default_rng([seed, _SPLIT_INDEX[split], 1])

    scenes, images, annotations, records = [], [], [], []
    for index in range(num_images):
        image_id = _SPLIT_INDEX[split] * _MAX_IMAGES + index + 1
        file_name = f"COCO_{folder}_{image_id:012d}.jpg"
        background, canvas = _background(scene_rng, image_size)
        objects, rasters = _place_objects(scene_rng, image_size, shapes, first_shapes)
        for obj, raster in zip(objects, rasters):
            _paint(canvas, raster, obj, scene_rng)
        path = out_dir / folder / file_name
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(path, quality=95)
        scenes.append(Scene(image_id, path, background, tuple(objects)))
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        annotations.append(
            [
                _annotation(o, r, v, compressed=format == "rio")
                for o, r, v in zip(objects, rasters, _visible_regions(rasters))
            ]
        )

    if format == "rio":
        for scene, image, anns in zip(scenes, images, annotations):
            for task_index in task_rng.choice(len(TASKS), size=tasks_per_image, replace=False):
                task = TASKS[task_index]
                if holdout != "phrasing":
                    sentences = task.phrasings + task.heldout_phrasings
                else:
                    sentences = task.heldout_phrasings if evaluation else task.phrasings
                answer = [a for o, a in zip(scene.objects, anns) if task.trait in o.traits]
                records.append(
                    {
                        "image_id": scene.image_id,
                        "height": image["height"],
                        "width": image["width"],
                        "task_id": _SPLIT_INDEX[split] * _MAX_IMAGES * len(TASKS) + len(records) + 1,
                        "expressions": [sentences[task_rng.integers(len(sentences))]],
                        "bbox_list": [a["bbox"] for a in answer],
                        "mask_list": [a["segmentation"] for a in answer],
                    }
                )
        _write_json(out_dir / f"RIO_{split}_all_thing.json", records)
        return scenes

    image_records = [
        {**image, "license": 0, "coco_url": "", "flickr_url": "", "date_captured": ""} for image in images
    ]
    shape_ids = {shape: i + 1 for i, shape in enumerate(SHAPE_TRAITS)}
    for number, task in enumerate(TASKS, start=1):
        task_annotations = [
            {
                **annotation,
                "iscrowd": 0,
                "image_id": scene.image_id,
                "id": scene.image_id * 100 + k,
                "COCO_category_id": shape_ids[obj.shape],
                "category_id": int(task.trait in obj.traits),
            }
            for scene, anns in zip(scenes, annotations)
            for k, (obj, annotation) in enumerate(zip(scene.objects, anns))
        ]
        _write_json(
            out_dir / f"task_{number}_{split}.json",
            {
                "info": {"description": f"synthetic task world, task {number}: {task.name}"},
                "images": image_records,
                "licenses": [],
                "annotations": task_annotations,
                "categories": [{"id": 0, "name": "not preferred"}, {"id": 1, "name": "preferred"}],
            },
        )
    return scenes


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def main(argv=None) -> None:
    """The command line: one-line errors, exit status 2 for a bad argument and 1 for an output folder that cannot be
    written."""
    parser = argparse.ArgumentParser(description="Write a synthetic task-oriented segmentation split.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--format", choices=tuple(SPLITS), default="rio")
    parser.add_argument("--split", default="train")
    parser.add_argument("--holdout", choices=("phrasing", "objects"), default=None)
    parser.add_argument("--tasks-per-image", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        scenes = generate(
            args.out,
            args.num_images,
            seed=args.seed,
            image_size=args.image_size,
            format=args.format,
            split=args.split,
            holdout=args.holdout,
            tasks_per_image=args.tasks_per_image,
        )
    except ValueError as error:  # a bad argument: nothing was written
        parser.error(str(error))
    except OSError as error:  # the output folder cannot be written
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"wrote {len(scenes)} {args.split} images in {args.format} format to {args.out}")


if __name__ == "__main__":
    main()
