import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from PIL import Image
from pycocotools import mask as mask_utils

from modeling_vltp.data import (
    COCO_TASKS_NAMES,
    decode_mask,
    decode_mask_batch,
    load_coco_tasks,
    load_rio,
    resolve_task_names,
    synthetic,
)

DATA_FORMATS = Path(__file__).resolve().parents[2] / "shared" / "data-formats"
needs_excerpts = pytest.mark.skipif(not DATA_FORMATS.is_dir(), reason="../shared/data-formats is not present")

H, W = 20, 30


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _make_image(root: Path, folder: str, file_name: str, width: int = W, height: int = H) -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(root / folder / file_name)


def _stored_path(dataset, index: int) -> str:
    """The image path stored in row ``index``, read without the decoding transform."""
    return dataset.with_format(None)[index]["image"]["path"]


def _rectangle(x0, y0, x1, y1):
    """Axis-aligned polygon with integer corners: it covers exactly the pixels x0..x1-1, y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _expected(*rectangles, shape=(H, W)):
    mask = np.zeros(shape, dtype=np.uint8)
    for x0, y0, x1, y1 in rectangles:
        mask[y0:y1, x0:x1] = 1
    return mask


# A blob for the RLE cases, independent of any polygon.
BLOB = _expected((3, 4, 9, 12))
BLOB[6, 25:28] = 1


def _uncompressed(mask):
    flat = mask.flatten(order="F").tolist()
    runs, value, length = [], 0, 0
    for pixel in flat:
        if pixel == value:
            length += 1
        else:
            runs.append(length)
            value, length = pixel, 1
    return {"size": list(mask.shape), "counts": runs + [length]}


def _compressed(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


# ---------------------------------------------------------------- RIO


def _rio_records():
    return [
        {  # two instances, one with two polygons; expressions as a one-element list
            "image_id": 11,
            "height": H,
            "width": W,
            "task_id": 501,
            "expressions": ["you can use the thing to sit on."],
            "bbox_list": [[2, 2, 4, 3], [10, 5, 10, 10]],
            "mask_list": [[_rectangle(2, 2, 6, 5)], [_rectangle(10, 5, 14, 15), _rectangle(14, 10, 20, 15)]],
        },
        {  # uncompressed RLE; expressions as a bare string
            "image_id": 12,
            "height": H,
            "width": W,
            "task_id": 502,
            "expressions": "you can use the thing to cut bread.",
            "bbox_list": [[3, 4, 25, 8]],
            "mask_list": [_uncompressed(BLOB)],
        },
        {  # compressed RLE
            "image_id": 11,
            "height": H,
            "width": W,
            "task_id": 503,
            "expressions": ["you can use the thing to drink."],
            "bbox_list": [[3, 4, 25, 8]],
            "mask_list": [_compressed(BLOB)],
        },
        {  # no positive instance
            "image_id": 12,
            "height": H,
            "width": W,
            "task_id": 504,
            "expressions": ["you can use the thing to fly."],
            "bbox_list": [],
            "mask_list": [],
        },
    ]


@pytest.fixture
def rio_dir(tmp_path):
    for image_id in (11, 12):
        _make_image(tmp_path, "val2014", f"COCO_val2014_{image_id:012d}.jpg")
    _write_json(tmp_path / "RIO_common_all_thing.json", _rio_records())
    return tmp_path


def test_rio_loads_polygons_and_both_rle_encodings(rio_dir):
    dataset = load_rio(rio_dir, rio_dir, "common")
    assert len(dataset) == 4
    assert {"image", "task", "mask", "image_id", "task_id", "boxes"} <= set(dataset.column_names)
    rows = [dataset[i] for i in range(4)]
    assert [r["task"] for r in rows] == [
        "you can use the thing to sit on.",
        "you can use the thing to cut bread.",
        "you can use the thing to drink.",
        "you can use the thing to fly.",
    ]
    assert [r["task_id"] for r in rows] == [501, 502, 503, 504]
    assert [r["image_id"] for r in rows] == [11, 12, 11, 12]
    np.testing.assert_array_equal(rows[0]["mask"], _expected((2, 2, 6, 5), (10, 5, 14, 15), (14, 10, 20, 15)))
    np.testing.assert_array_equal(rows[1]["mask"], BLOB)
    np.testing.assert_array_equal(rows[2]["mask"], BLOB)
    np.testing.assert_array_equal(rows[3]["mask"], np.zeros((H, W)))
    assert all(r["mask"].dtype == np.uint8 for r in rows)
    assert rows[0]["boxes"] == [[2, 2, 4, 3], [10, 5, 10, 10]] and rows[3]["boxes"] == []
    assert rows[0]["image"].size == (W, H)
    assert rows[0]["image"].mode == "RGB"
    assert _stored_path(dataset, 0).endswith("val2014/COCO_val2014_000000000011.jpg")


def test_rio_accepts_the_file_itself_and_uses_train2014_for_train(tmp_path):
    records = _rio_records()[:1]
    _make_image(tmp_path, "train2014", "COCO_train2014_000000000011.jpg")
    dataset = load_rio(_write_json(tmp_path / "my_rio.json", records), tmp_path, "train")
    assert _stored_path(dataset, 0).endswith("train2014/COCO_train2014_000000000011.jpg")
    with pytest.raises(FileNotFoundError, match="val2014/COCO_val2014_000000000011.jpg"):
        load_rio(tmp_path / "my_rio.json", tmp_path, "uncommon")


def test_rio_stores_paths_and_encoded_masks_and_decodes_on_read(rio_dir):
    dataset = load_rio(rio_dir, rio_dir, "common")
    stored = dataset.with_format(None)  # no transform, no decoding
    assert isinstance(stored[0]["mask"], str)
    assert json.loads(stored[0]["mask"])["size"] == [H, W]
    assert dataset.features["mask"].dtype == "string"
    assert stored[0]["image"]["bytes"] is None and stored[0]["image"]["path"].endswith("COCO_val2014_000000000011.jpg")
    np.testing.assert_array_equal(decode_mask(stored[1]["mask"]), BLOB)


def _set(field, value):
    def mutate(record):
        record[field] = value

    return mutate


def _delete(field):
    def mutate(record):
        del record[field]

    return mutate


BAD_RIO_RECORDS = {
    # name: (mutation of record 1, field named in the error, words of the reason)
    "missing image_id": (_delete("image_id"), "image_id", "missing"),
    "missing height": (_delete("height"), "height", "missing"),
    "missing width": (_delete("width"), "width", "missing"),
    "missing task_id": (_delete("task_id"), "task_id", "missing"),
    "missing expressions": (_delete("expressions"), "expressions", "missing"),
    "missing bbox_list": (_delete("bbox_list"), "bbox_list", "missing"),
    "missing mask_list": (_delete("mask_list"), "mask_list", "missing"),
    "two expressions": (_set("expressions", ["a", "b"]), "expressions", "one-element list"),
    "string image id": (_set("image_id", "12"), "image_id", "expected int"),
    "odd polygon": (_set("mask_list", [[[1, 1, 5, 1, 5]]]), r"mask_list\[0\]", "even number"),
    "polygon of two points": (_set("mask_list", [[[1, 1, 5, 1]]]), r"mask_list\[0\]", "at least 6"),
    "flat polygon": (_set("mask_list", [[1, 1, 5, 1, 5, 5]]), r"mask_list\[0\]", "flat list"),
    "text in polygon": (_set("mask_list", [[[1, 1, "x", 1, 5, 5]]]), r"mask_list\[0\]", "finite numbers"),
    "polygon outside": (_set("mask_list", [[_rectangle(2, 2, W + 5, 5)]]), r"mask_list\[0\]", "outside the image"),
    "rle counts short": (_set("mask_list", [{"size": [H, W], "counts": [5, 10]}]), r"mask_list\[0\]", "cover"),
    "rle bad characters": (_set("mask_list", [{"size": [H, W], "counts": "0::~~ "}]), r"mask_list\[0\]", "alphabet"),
    "rle truncated": (_set("mask_list", [{"size": [H, W], "counts": "0::h"}]), r"mask_list\[0\]", "ends inside"),
    "rle other size": (
        _set("mask_list", [_compressed(np.zeros((H, W + 1), np.uint8))]),
        r"mask_list\[0\]",
        "does not match",
    ),
    "rle without counts": (_set("mask_list", [{"size": [H, W]}]), r"mask_list\[0\]", "'counts'"),
    "box outside": (_set("bbox_list", [[20, 4, 15, 3]]), r"bbox_list\[0\]", "outside the image"),
    "box of three": (_set("bbox_list", [[2, 4, 15]]), r"bbox_list\[0\]", "4 finite numbers"),
    "zero height": (_set("height", 0), "height", "not positive"),
    "huge height": (_set("height", 100000), "height", "exceeds the limit of 8192"),
    "huge width": (_set("width", 65537), "width", "exceeds the limit of 8192"),
}


@pytest.mark.parametrize("case", list(BAD_RIO_RECORDS))
def test_rio_bad_record_names_file_index_and_field(rio_dir, case):
    mutate, field, reason = BAD_RIO_RECORDS[case]
    records = _rio_records()
    mutate(records[1])
    _write_json(rio_dir / "RIO_common_all_thing.json", records)
    with pytest.raises(ValueError, match=rf"RIO_common_all_thing\.json: record 1: field '{field}': .*{reason}"):
        load_rio(rio_dir, rio_dir, "common")


def test_rio_missing_files(rio_dir):
    with pytest.raises(FileNotFoundError, match=r"RIO_train_all_thing\.json"):
        load_rio(rio_dir, rio_dir, "train")
    (rio_dir / "val2014" / "COCO_val2014_000000000012.jpg").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"RIO_common_all_thing\.json: record 1: field 'image_id': image file not found: .*000000000012",
    ):
        load_rio(rio_dir, rio_dir, "common")


def test_rio_unreadable_file_and_bad_split(rio_dir):
    (rio_dir / "RIO_common_all_thing.json").write_text("[{")
    with pytest.raises(ValueError, match=r"RIO_common_all_thing\.json: not valid JSON"):
        load_rio(rio_dir, rio_dir, "common")
    _write_json(rio_dir / "RIO_common_all_thing.json", {"records": []})
    with pytest.raises(ValueError, match="JSON list"):
        load_rio(rio_dir, rio_dir, "common")
    with pytest.raises(ValueError, match="split"):
        load_rio(rio_dir, rio_dir, "val")


def test_rio_skip_bad_records_reports_which(rio_dir, caplog):
    records = _rio_records()
    del records[1]["mask_list"]
    records[3]["bbox_list"] = [[0, 0, W + 10, 1]]
    _write_json(rio_dir / "RIO_common_all_thing.json", records)
    with caplog.at_level(logging.WARNING):
        dataset = load_rio(rio_dir, rio_dir, "common", skip_bad_records=True)
    assert [dataset[i]["task_id"] for i in range(len(dataset))] == [501, 503]
    description = dataset.info.description
    assert "Skipped 2 bad record(s)" in description
    assert "record 1: field 'mask_list': missing" in description
    assert "record 3: field 'bbox_list[0]'" in description
    assert "skipped 2 bad record(s)" in caplog.text and "record 3" in caplog.text


def test_rio_edited_file_is_not_served_from_cache(rio_dir):
    assert len(load_rio(rio_dir, rio_dir, "common")) == 4
    _write_json(rio_dir / "RIO_common_all_thing.json", _rio_records()[:2])
    assert len(load_rio(rio_dir, rio_dir, "common")) == 2


# ---------------------------------------------------------------- COCO-Tasks


def _coco_image(image_id, folder="val2014"):
    return {
        "id": image_id,
        "file_name": f"COCO_{folder}_{image_id:012d}.jpg",
        "height": H,
        "width": W,
        "license": 1,
        "coco_url": "",
        "flickr_url": "",
        "date_captured": "",
    }


def _coco_annotation(ann_id, image_id, category_id, segmentation, bbox, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "COCO_category_id": 62,
        "segmentation": segmentation,
        "bbox": bbox,
        "area": 1.0,
        "iscrowd": iscrowd,
    }


def _official_task_file():
    return {
        "info": {},
        "licenses": [],
        "categories": [{"id": 0, "name": "no"}, {"id": 1, "name": "yes"}],
        "images": [_coco_image(21), _coco_image(22), _coco_image(23, folder="train2014")],
        "annotations": [
            _coco_annotation(1, 21, 1, [_rectangle(1, 1, 5, 4)], [1, 1, 4, 3]),
            _coco_annotation(2, 21, 0, [_rectangle(10, 10, 20, 20)], [10, 10, 10, 10]),  # not preferred
            _coco_annotation(3, 21, 1, _uncompressed(BLOB), [3, 4, 25, 8], iscrowd=1),
            _coco_annotation(4, 22, 0, [_rectangle(0, 0, 30, 20)], [0, 0, 30, 20]),
            _coco_annotation(5, 23, 1, _compressed(BLOB), [3, 4, 25, 8]),
        ],
    }


@pytest.fixture
def coco_dir(tmp_path):
    for image in _official_task_file()["images"]:
        _make_image(tmp_path, image["file_name"].split("_")[1], image["file_name"])
    data = _official_task_file()
    _write_json(tmp_path / "task_3_test.json", data)
    for annotation in data["annotations"]:  # task 5: every object is preferred
        annotation["category_id"] = 1
    _write_json(tmp_path / "task_5_test.json", data)
    return tmp_path


def test_coco_tasks_official_format(coco_dir):
    dataset = load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3, 5])
    rows = [dataset[i] for i in range(len(dataset))]
    assert [(r["task_id"], r["image_id"]) for r in rows] == [(3, 21), (3, 22), (3, 23), (5, 21), (5, 22), (5, 23)]
    assert rows[0]["task"] == "you can use the thing to place flowers"
    assert rows[3]["task"] == "you can use the thing to water plant"
    np.testing.assert_array_equal(rows[0]["mask"], np.maximum(_expected((1, 1, 5, 4)), BLOB))
    np.testing.assert_array_equal(rows[1]["mask"], np.zeros((H, W)))  # only a non-preferred object
    np.testing.assert_array_equal(rows[2]["mask"], BLOB)
    np.testing.assert_array_equal(rows[3]["mask"], np.maximum(_expected((1, 1, 5, 4), (10, 10, 20, 20)), BLOB))
    np.testing.assert_array_equal(rows[4]["mask"], np.ones((H, W)))
    assert rows[0]["boxes"] == [[1, 1, 4, 3], [3, 4, 25, 8]] and rows[1]["boxes"] == []
    # The folder follows the file-name prefix, not the split.
    assert _stored_path(dataset, 2).endswith("train2014/COCO_train2014_000000000023.jpg")
    assert _stored_path(dataset, 0).endswith("val2014/COCO_val2014_000000000021.jpg")


def test_coco_tasks_template_and_names(coco_dir):
    dataset = load_coco_tasks(coco_dir, coco_dir, "test", tasks=[5], template="what can I {task} with?")
    assert dataset[0]["task"] == "what can I water plant with?"
    assert COCO_TASKS_NAMES[0] == "step on" and COCO_TASKS_NAMES[13] == "pound carpet" and len(COCO_TASKS_NAMES) == 14
    with pytest.raises(ValueError, match="template"):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[5], template="no placeholder")
    for template in ("use {0} to {task}", "{task} or {task}", "{task} {other}", "{task"):
        with pytest.raises(ValueError, match=r"template"):
            load_coco_tasks(coco_dir, coco_dir, "test", tasks=[5], template=template)
    assert (
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[5], template="{{ {task} }}")[0]["task"] == "{ water plant }"
    )
    with pytest.raises(ValueError, match="subset of 1..14"):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[15])


def test_coco_tasks_missing_task_file_is_named(coco_dir):
    with pytest.raises(FileNotFoundError, match=r"task_4_test\.json"):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3, 4])
    with pytest.raises(FileNotFoundError, match=r"task_1_test\.json"):
        load_coco_tasks(coco_dir, coco_dir, "test")  # all 14 tasks by default


BAD_COCO_RECORDS = {
    # name: (mutation of the task file, record named in the error, field, words of the reason)
    "missing file_name": (lambda d: d["images"][1].pop("file_name"), r"images\[1\]", "file_name", "missing"),
    "missing image height": (lambda d: d["images"][0].pop("height"), r"images\[0\]", "height", "missing"),
    "missing image id": (lambda d: d["images"][2].pop("id"), r"images\[2\]", "id", "missing"),
    "preference flag 2": (
        lambda d: d["annotations"][1].update(category_id=2),
        r"annotations\[1\]",
        "category_id",
        r"\[0, 1\]",
    ),
    "missing category": (
        lambda d: d["annotations"][1].pop("category_id"),
        r"annotations\[1\]",
        "category_id",
        "missing",
    ),
    "unknown image": (lambda d: d["annotations"][3].update(image_id=99), r"annotations\[3\]", "image_id", "no entry"),
    "missing segmentation": (
        lambda d: d["annotations"][0].pop("segmentation"),
        r"annotations\[0\]",
        "segmentation",
        "missing",
    ),
    "missing bbox": (lambda d: d["annotations"][4].pop("bbox"), r"annotations\[4\]", "bbox", "missing"),
    "bad polygon": (
        lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]),
        r"annotations\[0\]",
        "segmentation",
        "at least 6",
    ),
    "bad rle": (
        lambda d: d["annotations"][2]["segmentation"]["counts"].append(3),
        r"annotations\[2\]",
        "segmentation",
        "cover",
    ),
    "mask outside": (
        lambda d: d["annotations"][0].update(segmentation=[_rectangle(-5, 1, 5, 4)]),
        r"annotations\[0\]",
        "segmentation",
        "outside",
    ),
    "box outside": (lambda d: d["annotations"][4].update(bbox=[3, 4, 25, 80]), r"annotations\[4\]", "bbox", "outside"),
}


@pytest.mark.parametrize("case", list(BAD_COCO_RECORDS))
def test_coco_tasks_bad_record_names_file_index_and_field(coco_dir, case):
    mutate, record, field, reason = BAD_COCO_RECORDS[case]
    data = _official_task_file()
    mutate(data)
    _write_json(coco_dir / "task_3_test.json", data)
    with pytest.raises(ValueError, match=rf"task_3_test\.json: {record}: field '{field}': .*{reason}"):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3])


def test_coco_tasks_bad_file_structure(coco_dir):
    data = _official_task_file()
    del data["annotations"]
    _write_json(coco_dir / "task_3_test.json", data)
    with pytest.raises(ValueError, match=r"task_3_test\.json: field 'annotations'"):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3])


def test_coco_tasks_missing_image_and_skipping(coco_dir, caplog):
    (coco_dir / "val2014" / "COCO_val2014_000000000022.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"task_3_test\.json: images\[1\]: field 'file_name': image file not found"
    ):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3])
    data = _official_task_file()
    data["annotations"][0]["segmentation"] = [[1, 2, 3]]  # breaks the sample of image 21
    _write_json(coco_dir / "task_3_test.json", data)
    with caplog.at_level(logging.WARNING):
        dataset = load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3, 5], skip_bad_records=True)
    assert [(dataset[i]["task_id"], dataset[i]["image_id"]) for i in range(len(dataset))] == [
        (3, 23),
        (5, 21),
        (5, 23),
    ]
    description = dataset.info.description
    assert "Skipped 3 bad record(s)" in description
    assert "task_3_test.json: images[1]: field 'file_name'" in description
    assert "task_3_test.json: annotations[0]: field 'segmentation'" in description
    assert "(sample of image 21)" in description
    assert "task_5_test.json: images[1]: field 'file_name'" in description
    assert "skipped 3 bad record(s)" in caplog.text


def _cotdet_file(task, category_id):
    data = _official_task_file()
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 1]
    for annotation in data["annotations"]:
        annotation["category_id"] = category_id
    data["categories"] = [
        {"supercategory": "object", "id": i, "name": name} for i, name in enumerate(COCO_TASKS_NAMES)
    ]
    return data


def test_coco_tasks_cotdet_variant_is_recognised(coco_dir):
    # In the CoTDet re-pack task 1's preferred objects carry category_id 0, which the official
    # format would read as "not preferred".
    _write_json(coco_dir / "coco_task_test1.json", _cotdet_file(1, category_id=0))
    dataset = load_coco_tasks(coco_dir, coco_dir, "test", tasks=[1])
    np.testing.assert_array_equal(dataset[0]["mask"], np.maximum(_expected((1, 1, 5, 4)), BLOB))
    np.testing.assert_array_equal(dataset[2]["mask"], BLOB)
    _write_json(coco_dir / "coco_task_test1.json", _cotdet_file(1, category_id=3))
    with pytest.raises(
        ValueError, match=r"coco_task_test1\.json: annotations\[0\]: field 'category_id': expected one of \[0\]"
    ):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[1])


# ---------------------------------------------------------------- real excerpts


def _polygon_bbox(segmentation):
    xs = [x for polygon in segmentation for x in polygon[0::2]]
    ys = [y for polygon in segmentation for y in polygon[1::2]]
    return min(xs), min(ys), max(xs), max(ys)


@needs_excerpts
def test_real_cotdet_excerpts_load(tmp_path):
    for task in (1, 2):
        shutil.copy(
            DATA_FORMATS / f"coco_tasks_excerpt_cotdet_task{task}_test.json", tmp_path / f"coco_task_test{task}.json"
        )
    data = json.loads((tmp_path / "coco_task_test1.json").read_text())
    for image in data["images"]:  # the COCO images are not available: stand-ins of the recorded size
        _make_image(tmp_path, "val2014", image["file_name"], image["width"], image["height"])

    dataset = load_coco_tasks(tmp_path, tmp_path, "test", tasks=[1, 2])
    assert len(dataset) == 2 * len(data["images"])
    official_order = [
        int(line) for line in (DATA_FORMATS / "coco_tasks_imgIds_task_1_test_first10.txt").read_text().split()
    ]
    assert [dataset[i]["image_id"] for i in range(5)] == official_order[:5]
    assert dataset[0]["task"] == "you can use the thing to step on"
    assert dataset[len(data["images"])]["task"] == "you can use the thing to sit comfortably"

    positives = {}
    for annotation in data["annotations"]:
        positives.setdefault(annotation["image_id"], []).append(annotation)
    for i in range(len(dataset)):
        row = dataset[i]
        assert row["mask"].shape == (row["height"], row["width"])
        annotations = positives.get(row["image_id"], [])
        # Independent of pycocotools: COCO's recorded areas and the polygons' extent.
        assert row["mask"].sum() == pytest.approx(sum(a["area"] for a in annotations), rel=0.02, abs=0)
        assert row["boxes"] == [pytest.approx(a["bbox"]) for a in annotations]
        if annotations:
            ys, xs = np.nonzero(row["mask"])
            extents = [_polygon_bbox(a["segmentation"]) for a in annotations]
            assert xs.min() >= min(e[0] for e in extents) - 1 and xs.max() <= max(e[2] for e in extents) + 1
            assert ys.min() >= min(e[1] for e in extents) - 1 and ys.max() <= max(e[3] for e in extents) + 1

    (tmp_path / "val2014" / data["images"][1]["file_name"]).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=rf"coco_task_test1\.json: images\[1\]: field 'file_name'.*{data['images'][1]['file_name']}",
    ):
        load_coco_tasks(tmp_path, tmp_path, "test", tasks=[1])


@needs_excerpts
def test_real_rio_expressions_round_trip(tmp_path):
    expressions = json.loads((DATA_FORMATS / "rio_expressions_from_example_notebook.json").read_text())
    template = _rio_records()[0]
    records = []
    for index, expression in enumerate(expressions):
        record = copy.deepcopy(template)
        record["task_id"] = index
        record["expressions"] = expression if index % 2 else expression[0]  # list and bare-string forms
        records.append(record)
    _write_json(tmp_path / "RIO_uncommon_all_thing.json", records)
    _make_image(tmp_path, "val2014", "COCO_val2014_000000000011.jpg")
    dataset = load_rio(tmp_path, tmp_path, "uncommon")
    assert dataset["task"] == [expression[0] for expression in expressions]


# ---------------------------------------------------------------- working directory, images, odd files


def test_rows_store_absolute_image_paths_whatever_the_working_directory(tmp_path, monkeypatch):
    """The cache is keyed on resolved paths: its rows must not hold paths relative to the first caller's folder."""
    world, decoy = tmp_path / "a" / "world", tmp_path / "b" / "world"
    _make_image(world, "val2014", "COCO_val2014_000000000011.jpg")
    _make_image(decoy, "val2014", "COCO_val2014_000000000011.jpg", width=64, height=64)  # same relative path
    annotations = _write_json(world / "RIO_common_all_thing.json", _rio_records()[:1])
    (tmp_path / "a" / "train").mkdir()
    (tmp_path / "b" / "eval").mkdir()
    monkeypatch.chdir(tmp_path / "a" / "train")
    assert load_rio(annotations, "../world", "common")[0]["image"].size == (W, H)
    monkeypatch.chdir(tmp_path / "b" / "eval")  # same files, same cache key; "../world" is the decoy here
    dataset = load_rio(annotations, world, "common")
    assert _stored_path(dataset, 0) == str(world / "val2014" / "COCO_val2014_000000000011.jpg")
    assert dataset[0]["image"].size == (W, H)
    monkeypatch.chdir(tmp_path)  # run from the parent folder
    assert load_rio(annotations, world, "common")[0]["image"].size == (W, H)


def test_coco_tasks_duplicate_image_ids_are_refused(coco_dir, caplog):
    data = _official_task_file()
    data["images"][2]["id"] = 21  # images[2] (COCO_train2014_...23.jpg) reuses the id of images[0]
    _write_json(coco_dir / "task_3_test.json", data)
    with pytest.raises(
        ValueError, match=r"task_3_test\.json: images\[2\]: field 'id': image id 21 is also .*images\[0\]"
    ):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3])
    data["annotations"] = data["annotations"][:4]  # annotation 5 pointed at image 23, which is no longer listed
    _write_json(coco_dir / "task_3_test.json", data)
    with caplog.at_level(logging.WARNING):
        dataset = load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3], skip_bad_records=True)
    assert [dataset[i]["image_id"] for i in range(len(dataset))] == [22]  # neither entry of id 21 is kept
    assert "images[2]: field 'id': image id 21 is also the id of images[0]" in dataset.info.description


def _exif_oriented_image(root: Path, file_name: str, stored_width: int, stored_height: int) -> None:
    """An image stored as stored_width x stored_height with EXIF orientation 6 (shown rotated by 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (stored_width, stored_height), (90, 120, 150)).save(root / "val2014" / file_name, exif=exif)


def test_images_open_in_the_displayed_orientation_and_sizes_are_compared(rio_dir):
    _exif_oriented_image(rio_dir, "COCO_val2014_000000000011.jpg", stored_width=H, stored_height=W)  # shown W x H
    dataset = load_rio(rio_dir, rio_dir, "common")
    assert dataset[0]["image"].size == (W, H) and dataset[0]["mask"].shape == (H, W)
    _exif_oriented_image(rio_dir, "COCO_val2014_000000000011.jpg", stored_width=W, stored_height=H)  # shown H x W
    dataset = load_rio(rio_dir, rio_dir, "common")
    with pytest.raises(
        ValueError,
        match=r"RIO_common_all_thing\.json: record 0: field 'height': annotated size 20x30 .* 30x20 \(after its EXIF",
    ):
        dataset[0]


def test_sixteen_bit_images_are_scaled(rio_dir):
    grey = np.full((H, W), 32896, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(rio_dir / "val2014" / "COCO_val2014_000000000011.jpg", format="PNG")
    image = load_rio(rio_dir, rio_dir, "common")[0]["image"]
    assert image.mode == "RGB" and np.asarray(image).tolist()[0][0] == [128, 128, 128]


def _truncate(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])


def test_unreadable_and_mis_sized_images_name_file_record_and_field(rio_dir):
    _truncate(rio_dir / "val2014" / "COCO_val2014_000000000012.jpg")
    records = _rio_records()
    records[2]["height"], records[2]["width"] = 2 * H, 2 * W  # a valid polygon on a 40x60 annotation of a 20x30 image
    records[2]["mask_list"] = [[_rectangle(1, 1, 5, 5)]]
    _write_json(rio_dir / "RIO_common_all_thing.json", records)
    dataset = load_rio(rio_dir, rio_dir, "common")  # images are opened when rows are read
    with pytest.raises(ValueError, match=r"record 1: field 'image': cannot read image .*COCO_val2014_000000000012"):
        dataset[1]
    with pytest.raises(ValueError, match=r"record 2: field 'height': annotated size 40x60 .* is 20x30"):
        dataset[2]
    with pytest.raises(ValueError, match=r"RIO_common_all_thing\.json: record 1: field 'image': cannot read image"):
        load_rio(rio_dir, rio_dir, "common", check_images=True)
    dataset = load_rio(rio_dir, rio_dir, "common", check_images=True, skip_bad_records=True)
    assert [dataset[i]["task_id"] for i in range(len(dataset))] == [501]
    assert "Skipped 3 bad record(s)" in dataset.info.description
    assert "record 2: field 'height': annotated size 40x60" in dataset.info.description


def test_empty_and_entirely_bad_files_are_named(rio_dir, coco_dir):
    _write_json(rio_dir / "RIO_common_all_thing.json", [])
    with pytest.raises(ValueError, match=r"no records in .*RIO_common_all_thing\.json"):
        load_rio(rio_dir, rio_dir, "common")
    _write_json(rio_dir / "RIO_common_all_thing.json", [{"image_id": 1}, {"image_id": 2}])
    with pytest.raises(ValueError, match=r"every record is bad, 2 skipped:\n.*record 0: field 'height'.*\n.*record 1"):
        load_rio(rio_dir, rio_dir, "common", skip_bad_records=True)
    data = _official_task_file()
    data["images"], data["annotations"] = [], []
    _write_json(coco_dir / "task_3_test.json", data)
    with pytest.raises(ValueError, match=r"task_3_test\.json: field 'images': empty"):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3, 5])


def test_non_utf8_annotation_files_are_named(rio_dir):
    annotation = rio_dir / "RIO_common_all_thing.json"
    annotation.write_text(json.dumps(_rio_records()), encoding="utf-16")
    with pytest.raises(ValueError, match=r"RIO_common_all_thing\.json: not UTF-8 text"):
        load_rio(rio_dir, rio_dir, "common")
    Image.new("RGB", (4, 4)).save(annotation, format="PNG")
    with pytest.raises(ValueError, match=r"RIO_common_all_thing\.json: not UTF-8 text"):
        load_rio(rio_dir, rio_dir, "common")
    annotation.write_text(json.dumps(_rio_records()), encoding="utf-8-sig")  # a byte-order mark is fine
    assert len(load_rio(rio_dir, rio_dir, "common")) == 4


def test_file_names_outside_the_image_folder_need_permission(coco_dir):
    data = _official_task_file()
    data["images"][1]["file_name"] = "../../outside.jpg"
    _write_json(coco_dir / "task_3_test.json", data)
    _make_image(coco_dir / "val2014" / ".." / "..", ".", "outside.jpg")
    with pytest.raises(ValueError, match=r"images\[1\]: field 'file_name': '../../outside.jpg' points outside"):
        load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3])
    dataset = load_coco_tasks(coco_dir, coco_dir, "test", tasks=[3], allow_paths_outside_image_dir=True)
    assert _stored_path(dataset, 1) == str((coco_dir.parent / "outside.jpg").resolve())


def test_saved_rows_with_embedded_image_bytes_still_decode(rio_dir, tmp_path):
    """save_to_disk embeds the image files and keeps only their names: the row transform reads the bytes."""
    load_rio(rio_dir, rio_dir, "common").with_format(None).save_to_disk(tmp_path / "saved")
    (rio_dir / "val2014" / "COCO_val2014_000000000011.jpg").unlink()
    saved = load_from_disk(str(tmp_path / "saved"))
    saved.set_transform(decode_mask_batch)
    assert saved[0]["image"].size == (W, H) and saved[0]["mask"].shape == (H, W)


def test_task_names_are_a_list_or_the_name_of_a_set():
    assert resolve_task_names(None) == resolve_task_names("coco_tasks") == COCO_TASKS_NAMES
    assert resolve_task_names("synthetic") == synthetic.TASK_NAMES
    assert resolve_task_names(["cut", "sit on"]) == ("cut", "sit on")
    with pytest.raises(ValueError, match="one of 'coco_tasks', 'synthetic', got 'coco'"):
        resolve_task_names("coco")
