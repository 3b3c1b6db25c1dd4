import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from modeling_vltp.metrics import compute_tos_metrics, spearman_correlation, tos_metric_path, tos_metrics_from_counts


def _mask(shape, pixels):
    mask = np.zeros(shape, dtype=bool)
    for y, x in pixels:
        mask[y, x] = True
    return mask


# Four samples with hand-counted intersections (I) and unions (U):
#   0: target 3 px, prediction 2 of them + 1 outside      I=2 U=4 IoU=0.5
#   1: empty target, empty prediction                     I=0 U=0 IoU=empty_target_iou
#   2: empty target, prediction 2 px                      I=0 U=2 IoU=0
#   3: target 4 px (a 3x3 image), empty prediction        I=0 U=4 IoU=0
REFERENCES = [
    _mask((2, 3), [(0, 0), (0, 1), (0, 2)]),
    _mask((2, 2), []),
    _mask((4, 5), []),
    _mask((3, 3), [(0, 0), (1, 1), (2, 2), (0, 2)]),
]
PREDICTIONS = [
    _mask((2, 3), [(0, 0), (0, 1), (1, 1)]),
    _mask((2, 2), []),
    _mask((4, 5), [(3, 4), (2, 1)]),
    _mask((3, 3), []),
]


def test_giou_and_ciou_by_hand():
    results = compute_tos_metrics(PREDICTIONS, REFERENCES)
    assert results["gIoU"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)
    assert results["cIoU"] == pytest.approx(2 / (4 + 0 + 2 + 4))
    assert set(results) == {"gIoU", "cIoU"}


def test_empty_target_rule_is_a_parameter():
    results = compute_tos_metrics(PREDICTIONS, REFERENCES, empty_target_iou=0.0)
    assert results["gIoU"] == pytest.approx(0.5 / 4)  # PolyFormer's convention
    assert results["cIoU"] == pytest.approx(0.2)  # unions add nothing for the empty pair


def test_all_empty_split_scores_the_empty_target_iou():
    empty = [np.zeros((2, 2), dtype=bool)] * 3
    assert compute_tos_metrics(empty, empty) == {"gIoU": 1.0, "cIoU": 1.0}
    assert compute_tos_metrics(empty, empty, empty_target_iou=0.0) == {"gIoU": 0.0, "cIoU": 0.0}


def test_per_task_values_and_task_average():
    results = compute_tos_metrics(PREDICTIONS, REFERENCES, task_ids=["a", "a", "b", "b"])
    # task a: samples 0 and 1, I=2, U=4; task b: samples 2 and 3, I=0, U=6.
    assert results["per_task"] == {
        "a": {"gIoU": pytest.approx(0.75), "cIoU": pytest.approx(0.5), "num_samples": 2},
        "b": {"gIoU": 0.0, "cIoU": 0.0, "num_samples": 2},
    }
    assert results["mIoU_tasks"] == pytest.approx(0.25)
    assert results["cIoU"] == pytest.approx(0.2)  # the split-wide value is unchanged


def test_stacked_arrays_tensors_and_integer_masks_agree():
    predictions = np.stack([np.pad(p, ((0, 4 - p.shape[0]), (0, 5 - p.shape[1]))) for p in PREDICTIONS])
    references = np.stack([np.pad(r, ((0, 4 - r.shape[0]), (0, 5 - r.shape[1]))) for r in REFERENCES])
    # Padding only adds pixels outside both masks, so I and U are unchanged except sample 1 (still empty).
    expected = compute_tos_metrics(PREDICTIONS, REFERENCES, task_ids=[1, 1, 2, 2])
    assert compute_tos_metrics(predictions, references, task_ids=np.array([1, 1, 2, 2])) == expected
    tensors = compute_tos_metrics(
        torch.from_numpy(predictions),
        torch.from_numpy(references.astype(np.uint8)),
        task_ids=torch.tensor([1, 1, 2, 2]),
    )
    assert tensors == expected


@pytest.mark.parametrize(
    "predictions, references, task_ids, message",
    [
        (PREDICTIONS[:3], REFERENCES, None, "3 predictions but 4 references"),
        ([PREDICTIONS[0]], [REFERENCES[1]], None, r"sample 0: prediction shape \(2, 3\) != reference shape \(2, 2\)"),
        ([np.full((2, 2), 0.7)], [REFERENCES[1]], None, r"predictions\[0\] must be binary"),
        ([np.zeros(4, dtype=bool)], [np.zeros(4, dtype=bool)], None, r"predictions\[0\] must be a 2-D mask"),
        (PREDICTIONS, REFERENCES, [1, 2], "2 task ids for 4 samples"),
        ([], [], None, "no samples"),
    ],
)
def test_clear_errors(predictions, references, task_ids, message):
    with pytest.raises(ValueError, match=message):
        compute_tos_metrics(predictions, references, task_ids=task_ids)


def test_evaluate_module_loads_offline_and_matches(tmp_path):
    script = (
        "import json, sys, evaluate\n"
        "from modeling_vltp.metrics import tos_metric_path\n"
        "args = json.load(sys.stdin)\n"
        "metric = evaluate.load(tos_metric_path())\n"
        "print(json.dumps(metric.compute(**args)))\n"
    )
    arguments = {
        "predictions": [p.astype(int).tolist() for p in PREDICTIONS],
        "references": [r.astype(int).tolist() for r in REFERENCES],
        "task_ids": ["a", "a", "b", "b"],
        "empty_target_iou": 1.0,
    }
    # A fresh cache and no network: the module must come from the local path alone.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
    }
    completed = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(arguments),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    from_evaluate = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = compute_tos_metrics(PREDICTIONS, REFERENCES, task_ids=["a", "a", "b", "b"])
    assert from_evaluate == json.loads(json.dumps(expected))  # JSON round-trips floats exactly
    assert os.path.isfile(os.path.join(tos_metric_path(), "tos_iou.py"))


def test_metrics_from_pixel_counts_match_the_masks():
    rng = np.random.default_rng(0)
    predictions = [rng.random((5, 7)) > 0.5 for _ in range(6)] + [np.zeros((3, 3), bool)]
    references = [rng.random((5, 7)) > 0.6 for _ in range(6)] + [np.zeros((3, 3), bool)]
    tasks = np.array([1, 1, 2, 2, 3, 3, 3])
    intersections = [int((p & r).sum()) for p, r in zip(predictions, references)]
    unions = [int((p | r).sum()) for p, r in zip(predictions, references)]
    from_counts = tos_metrics_from_counts(intersections, unions, tasks)
    assert from_counts == compute_tos_metrics(predictions, references, tasks)
    assert from_counts["per_task"][3]["num_samples"] == 3


@pytest.mark.parametrize(
    "intersections, unions, options, message",
    [
        ([-5], [10], {}, "sample 0: intersection -5 and union 10 are not pixel counts"),
        ([20], [10], {}, "sample 0: intersection 20 and union 10 are not pixel counts"),
        ([1, 2], [3, -1], {}, "sample 1: intersection 2 and union -1"),
        ([1.5], [3], {}, "intersection 1.5 and union 3"),
        ([float("nan")], [3], {}, "intersection nan"),
        ([], [], {}, "no samples"),
        ([1], [2], {"empty_target_iou": 5}, "empty_target_iou must be a number from 0 to 1"),
        ([1], [2], {"empty_target_iou": float("nan")}, "empty_target_iou"),
        ([1], [2], {"empty_target_iou": True}, "empty_target_iou"),
        ([1], [2], {"task_ids": [1, 2]}, "2 task ids for 1 samples"),
    ],
)
def test_impossible_counts_are_refused(intersections, unions, options, message):
    with pytest.raises(ValueError, match=message):
        tos_metrics_from_counts(intersections, unions, **options)


def test_compute_refuses_an_empty_target_iou_outside_0_1():
    with pytest.raises(ValueError, match="empty_target_iou"):
        compute_tos_metrics(PREDICTIONS, REFERENCES, empty_target_iou=-1)


def _brute_force_spearman(x, y):
    """Spearman's rho from its definition: each value's rank is 1 + the number of smaller values + half the number of
    other equal values; then the Pearson correlation of the ranks, written out."""

    def ranks(values):
        return [1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    covariance = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return covariance / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def test_spearman_by_hand_with_ties_and_against_the_definition():
    # No ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) with rank differences d = (0, -1, 1, 0): 1 - 12 / 60.
    assert spearman_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    # Tied x: ranks (1.5, 1.5, 3) against (1, 2, 3): covariance 1.5, variances 1.5 and 2.
    assert spearman_correlation([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / 3**0.5, abs=1e-12)
    assert spearman_correlation([0.1, 0.5, 0.9], [3, 20, 1000]) == pytest.approx(1.0)  # any increasing relation
    assert spearman_correlation([0.1, 0.5, 0.9], [1.0, 0.2, 0.0]) == pytest.approx(-1.0)
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, y = rng.integers(0, 6, 30), rng.random(30).round(1)  # many ties on both sides
        assert spearman_correlation(x, y) == pytest.approx(_brute_force_spearman(x, y), abs=1e-12)


def test_spearman_is_none_when_undefined_and_refuses_bad_input():
    assert spearman_correlation([0.3], [0.7]) is None
    assert spearman_correlation([0.3, 0.3, 0.3], [0.1, 0.5, 0.9]) is None  # constant scores rank nothing
    assert spearman_correlation([], []) is None
    with pytest.raises(ValueError, match="same length"):
        spearman_correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        spearman_correlation([1, float("nan")], [1, 2])
