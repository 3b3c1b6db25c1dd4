import filecmp
import json
import re

import numpy as np
import pytest
from PIL import Image

from modeling_vltp.data import load_coco_tasks, load_rio, synthetic

SIZE = 96

# The task vocabulary as the documentation states it, written out independently of the module's
# trait tables: task name -> which objects answer it.
ANSWERS = {
    "roll across the floor": lambda o: o.shape in {"circle", "ring"},
    "build a stable tower": lambda o: o.shape in {"square", "hexagon"},
    "thread a rope through": lambda o: o.shape == "ring",
    "poke a hole in paper": lambda o: o.shape in {"triangle", "star", "diamond"},
    "decorate a christmas tree": lambda o: o.shape == "star",
    "warn others of danger": lambda o: o.colour == "red",
    "hide in the grass": lambda o: o.colour == "green",
    "light up a dark room": lambda o: o.colour == "yellow",
    "paint the sky": lambda o: o.colour == "blue",
    "wrap a present": lambda o: o.texture in {"striped", "dotted"},
    "cover a large hole": lambda o: o.size == "large",
    "carry in a small pocket": lambda o: o.size == "small",
}


def _inside_polygon(polygon, size):
    """Even-odd rule at pixel centres (x + 0.5, y + 0.5): a rasterisation independent of pycocotools."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    inside = np.zeros((size, size), dtype=bool)
    points = np.asarray(polygon, dtype=float).reshape(-1, 2)
    for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0)):
        crosses = (y0 > ys) != (y1 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_y = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at_y)
    return inside


def _near_edges(polygon, size, distance=1.0):
    """Pixels whose centre lies within ``distance`` of a polygon edge."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    near = np.zeros((size, size), dtype=bool)
    points = np.asarray(polygon, dtype=float).reshape(-1, 2)
    for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0)):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
        near |= np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy)) <= distance
    return near


def _independent_target(scene, answers, size):
    """Union of the visible parts of the answering objects, and the band of boundary pixels where
    pycocotools and the pixel-centre rule may legitimately disagree."""
    regions = [np.logical_or.reduce([_inside_polygon(p, size) for p in o.polygons]) for o in scene.objects]
    boundary = np.logical_or.reduce([_near_edges(p, size) for o in scene.objects for p in o.polygons])
    target = np.zeros((size, size), dtype=bool)
    for index, obj in enumerate(scene.objects):
        if answers(obj):
            hidden = np.logical_or.reduce([np.zeros((size, size), bool), *regions[index + 1 :]])
            target |= regions[index] & ~hidden
    return target, boundary


def _assert_matches_up_to_boundary(mask, target, boundary):
    # pycocotools rasterises polygons on a 5x upsampled grid, the reference uses pixel centres: the two
    # may differ only on pixels whose centre is within one pixel of an edge (of the object or of an
    # object hiding it). Everywhere else they must agree exactly.
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    disagree = mask.astype(bool) != target
    assert not (disagree & ~boundary).any()
    assert disagree.sum() <= 0.1 * max(target.sum(), 1) + 8


@pytest.fixture(scope="module")
def rio_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("rio")
    scenes = synthetic.generate(out, num_images=8, seed=3, image_size=SIZE, format="rio", split="train")
    return out, scenes


@pytest.fixture(scope="module")
def coco_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    scenes = synthetic.generate(
        out, num_images=5, seed=4, image_size=SIZE, format="coco_tasks", split="test", holdout="objects"
    )
    return out, scenes


def test_rio_round_trip_pixel_for_pixel(rio_world):
    out, scenes = rio_world
    dataset = load_rio(out, out, "train")
    assert len(dataset) == 8 * 3
    sentences = {s: t.name for t in synthetic.TASKS for s in t.phrasings + t.heldout_phrasings}
    by_id = {scene.image_id: scene for scene in scenes}
    for row in dataset:
        scene = by_id[row["image_id"]]
        target, boundary = _independent_target(scene, ANSWERS[sentences[row["task"]]], SIZE)
        _assert_matches_up_to_boundary(row["mask"], target, boundary)
        assert len(row["boxes"]) == sum(ANSWERS[sentences[row["task"]]](o) for o in scene.objects)
        assert row["image"].size == (SIZE, SIZE)
    rio = json.loads((out / "RIO_train_all_thing.json").read_text())
    encodings = {
        type(s).__name__ if isinstance(s, list) else type(s["counts"]).__name__ for r in rio for s in r["mask_list"]
    }
    assert encodings == {"list", "str"}  # polygons and, for partly hidden objects, compressed RLE


def test_coco_tasks_round_trip_pixel_for_pixel(coco_world):
    out, scenes = coco_world
    dataset = load_coco_tasks(out, out, "test", task_names=synthetic.TASK_NAMES)
    assert len(dataset) == len(synthetic.TASKS) * len(scenes)
    by_id = {scene.image_id: scene for scene in scenes}
    for row in dataset:
        name = synthetic.TASK_NAMES[row["task_id"] - 1]
        assert row["task"] == f"you can use the thing to {name}"
        target, boundary = _independent_target(by_id[row["image_id"]], ANSWERS[name], SIZE)
        _assert_matches_up_to_boundary(row["mask"], target, boundary)
    task = json.loads((out / "task_1_test.json").read_text())
    assert {type(a["segmentation"]).__name__ for a in task["annotations"]} == {"list", "dict"}
    assert {a["category_id"] for a in task["annotations"]} == {0, 1}


def test_tasks_pick_different_objects_and_some_have_no_answer(coco_world):
    out, scenes = coco_world
    dataset = load_coco_tasks(out, out, "test", task_names=synthetic.TASK_NAMES)
    masks = {}
    for row in dataset:
        masks.setdefault(row["image_id"], []).append(row["mask"])
    for image_masks in masks.values():
        answered = [m for m in image_masks if m.any()]
        assert any(m.any() != n.any() or (m != n).any() for m in answered for n in answered)  # Fig. 1c
        assert len(answered) < len(image_masks)  # some task has no answer in this image


def test_images_are_painted_from_the_annotated_regions(rio_world):
    _, scenes = rio_world
    checked = 0
    for scene in scenes:
        pixels = np.asarray(Image.open(scene.path).convert("RGB"), dtype=float)
        for obj in scene.objects:
            if obj.texture != "solid":
                continue
            target, boundary = _independent_target(scene, lambda o, obj=obj: o is obj, SIZE)
            interior = target & ~boundary
            if interior.sum() < 10:
                continue
            colour = np.median(pixels[interior], axis=0)
            assert np.abs(colour - synthetic.COLOURS[obj.colour]).max() < 40, (scene.path, obj)
            checked += 1
    assert checked >= 3


def test_coco_2014_naming(rio_world, coco_world):
    rio_out, rio_scenes = rio_world
    coco_out, coco_scenes = coco_world
    for scene in rio_scenes:
        assert (
            re.fullmatch(r"COCO_train2014_\d{12}\.jpg", scene.path.name) and scene.path.parent == rio_out / "train2014"
        )
        assert int(scene.path.stem[-12:]) == scene.image_id
    for scene in coco_scenes:
        assert re.fullmatch(r"COCO_val2014_\d{12}\.jpg", scene.path.name) and scene.path.parent == coco_out / "val2014"
    assert sorted(p.name for p in coco_out.glob("*.json")) == sorted(f"task_{n}_test.json" for n in range(1, 13))


def test_deterministic_for_a_seed(tmp_path):
    first = synthetic.generate(tmp_path / "a", 3, seed=11, image_size=64, format="rio", split="common")
    second = synthetic.generate(tmp_path / "b", 3, seed=11, image_size=64, format="rio", split="common")
    other = synthetic.generate(tmp_path / "c", 3, seed=12, image_size=64, format="rio", split="common")
    assert [s.objects for s in first] == [s.objects for s in second] != [s.objects for s in other]
    names = ["RIO_common_all_thing.json"] + [f"val2014/{s.path.name}" for s in first]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert match == names and not mismatch and not errors


def test_phrasing_holdout(tmp_path):
    synthetic.generate(tmp_path, 6, seed=0, image_size=48, split="train", holdout="phrasing")
    synthetic.generate(tmp_path, 6, seed=0, image_size=48, split="uncommon", holdout="phrasing")
    seen = {r["expressions"][0] for r in json.loads((tmp_path / "RIO_train_all_thing.json").read_text())}
    unseen = {r["expressions"][0] for r in json.loads((tmp_path / "RIO_uncommon_all_thing.json").read_text())}
    heldout = {s for t in synthetic.TASKS for s in t.heldout_phrasings}
    assert seen and unseen and not seen & unseen
    assert unseen <= heldout and not seen & heldout


def test_object_holdout(tmp_path, coco_world):
    train = synthetic.generate(
        tmp_path, 10, seed=0, image_size=48, format="coco_tasks", split="train", holdout="objects"
    )
    assert all(o.shape not in {"hexagon", "diamond"} for scene in train for o in scene.objects)
    _, test = coco_world
    assert all(any(o.shape in {"hexagon", "diamond"} for o in scene.objects) for scene in test)


def test_vocabulary_is_documented():
    assert len(synthetic.TASKS) <= 14 and set(synthetic.TASK_NAMES) == set(ANSWERS)
    for task in synthetic.TASKS:
        assert task.name in synthetic.__doc__


def test_bad_arguments():
    with pytest.raises(ValueError, match="format"):
        synthetic.generate("unused", 1, format="coco")
    with pytest.raises(ValueError, match="split"):
        synthetic.generate("unused", 1, format="coco_tasks", split="common")
    with pytest.raises(ValueError, match="phrasing"):
        synthetic.generate("unused", 1, format="coco_tasks", holdout="phrasing")


def test_command_line(tmp_path, capsys):
    synthetic.main(
        ["--out", str(tmp_path), "--num-images", "2", "--image-size", "48", "--format", "rio", "--split", "common"]
    )
    assert "wrote 2 common images" in capsys.readouterr().out
    assert len(load_rio(tmp_path, tmp_path, "common")) == 2 * 3


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num-images", "0"], "num_images must be in"),
        (["--num-images", "1", "--image-size", "100000"], "image_size must be in 32..2048"),
        (["--num-images", "1", "--split", "val"], "split of the rio format"),
        (["--num-images", "1", "--format", "coco_tasks", "--holdout", "phrasing"], "needs format='rio'"),
        (["--num-images", "1", "--tasks-per-image", "0"], "tasks_per_image"),
        (["--num-images", "1", "--seed", "-1"], "seed must be a non-negative"),
    ],
)
def test_command_line_errors_are_one_line_and_write_nothing(tmp_path, capsys, arguments, message):
    out = tmp_path / "world"
    with pytest.raises(SystemExit) as exit:
        synthetic.main(["--out", str(out), *arguments])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and message in error and "Traceback" not in error
    assert "error: " in error.strip().splitlines()[-1] and message in error.strip().splitlines()[-1]
    assert not out.exists()


def test_command_line_unwritable_output_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit:
        synthetic.main(["--out", str(tmp_path / "file"), "--num-images", "1", "--image-size", "32"])
    error = capsys.readouterr().err
    assert exit.value.code == 1 and len(error.strip().splitlines()) == 1 and "file" in error
