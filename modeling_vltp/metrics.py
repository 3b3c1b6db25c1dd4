"""Task-oriented segmentation metrics as RIO / COCO-Tasks are reported by LISA and VLTP.

For sample i with predicted mask P_i and target mask G_i, I_i = |P_i and G_i|, U_i = |P_i or G_i|:

* ``gIoU``: mean over samples of I_i / U_i (LISA's "gIoU"; PolyFormer's per-sample "mIoU").
* ``cIoU``: sum of I_i over sum of U_i (LISA's "cIoU", PolyFormer's "oIoU").
* ``mIoU_tasks`` (with ``task_ids``): the cIoU of each task, averaged over tasks; VLTP's "mIoU" on
  COCO-Tasks, where every task is evaluated on its own file.

``score_spearman`` ([`spearman_correlation`]) says how well a model's confidence (SAM's predicted IoU) ranks its
masks: the rank correlation of the scores with the samples' true IoUs.

Empty targets: a sample whose target and prediction are both empty (U_i = 0) scores
``empty_target_iou`` (1.0 as in LISA/VLTP; PolyFormer uses 0.0); an empty target with a non-empty
prediction scores 0, as does a missed non-empty target. A cIoU whose total union is 0 (every target
and prediction empty) is ``empty_target_iou`` too. About half of the COCO-Tasks test samples have an
empty target, so this choice moves the numbers a lot.
"""

from collections import defaultdict
from collections.abc import Hashable, Sequence
from numbers import Real
from pathlib import Path

import numpy as np


def tos_metric_path() -> str:
    """Directory of the ``evaluate`` metric module, for ``evaluate.load(tos_metric_path())`` (works offline)."""
    return str(Path(__file__).resolve().parent / "evaluate_metrics" / "tos_iou")


def _as_binary_mask(mask, name: str, index: int) -> np.ndarray:
    if hasattr(mask, "detach"):  # torch.Tensor
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name}[{index}] must be a 2-D mask, got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name}[{index}] must be binary (bool or 0/1); threshold logits or probabilities first")
        mask = mask.astype(bool)
    return mask


def _check_empty_target_iou(value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
        raise ValueError(f"empty_target_iou must be a number from 0 to 1 (an IoU), got {value!r}")


def _iou(intersection: int, union: int, empty_target_iou: float) -> float:
    return intersection / union if union else float(empty_target_iou)


def sample_ious(intersections: Sequence[int], unions: Sequence[int], empty_target_iou: float = 1.0) -> list[float]:
    """Each sample's IoU from its pixel intersection and union; `empty_target_iou` where both masks are empty."""
    return [_iou(intersection, union, empty_target_iou) for intersection, union in zip(intersections, unions)]


def compute_tos_metrics(
    predictions: Sequence,
    references: Sequence,
    task_ids: Sequence[Hashable] | None = None,
    empty_target_iou: float = 1.0,
) -> dict:
    """gIoU, cIoU and, given ``task_ids``, the task-averaged cIoU of binary masks.

    Args:
        predictions: one 2-D binary mask per sample (bool or 0/1; numpy, torch or nested lists), as a
            sequence of masks of any sizes or a stacked ``(N, H, W)`` array/tensor.
        references: the target masks, same number and per-sample shapes as ``predictions``.
        task_ids: optional task of each sample (any hashable), for ``mIoU_tasks`` and ``per_task``.
        empty_target_iou: IoU of a sample whose target and prediction are both empty.

    Returns:
        ``{"gIoU", "cIoU"}`` as floats, plus with ``task_ids`` ``"mIoU_tasks"`` and ``"per_task"``:
        ``{task_id: {"gIoU", "cIoU", "num_samples"}}`` in order of first appearance.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")

    intersections, unions = [], []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        prediction = _as_binary_mask(prediction, "predictions", index)
        reference = _as_binary_mask(reference, "references", index)
        if prediction.shape != reference.shape:
            raise ValueError(
                f"sample {index}: prediction shape {prediction.shape} != reference shape {reference.shape}"
            )
        intersections.append(int(np.logical_and(prediction, reference).sum()))
        unions.append(int(np.logical_or(prediction, reference).sum()))
    return tos_metrics_from_counts(intersections, unions, task_ids, empty_target_iou)


def tos_metrics_from_counts(
    intersections: Sequence[int],
    unions: Sequence[int],
    task_ids: Sequence[Hashable] | None = None,
    empty_target_iou: float = 1.0,
) -> dict:
    """The metrics of [`compute_tos_metrics`] from each sample's pixel intersection and union, for evaluation loops
    that count pixels as they go instead of keeping every mask. Raises ``ValueError`` for no samples, counts that
    cannot be pixel counts (negative, fractional, intersection above union) or an ``empty_target_iou`` outside
    [0, 1]."""
    if len(intersections) != len(unions):
        raise ValueError(f"got {len(intersections)} intersections but {len(unions)} unions")
    if not len(unions):
        raise ValueError("no samples to evaluate")
    if task_ids is not None and len(task_ids) != len(unions):
        raise ValueError(f"got {len(task_ids)} task ids for {len(unions)} samples")
    _check_empty_target_iou(empty_target_iou)
    if hasattr(task_ids, "tolist"):  # numpy array or tensor: hash plain Python values, not array scalars
        task_ids = task_ids.tolist()
    intersections, unions = [float(i) for i in intersections], [float(u) for u in unions]
    for index, (intersection, union) in enumerate(zip(intersections, unions)):
        if not (0 <= intersection <= union and intersection.is_integer() and union.is_integer()):
            raise ValueError(
                f"sample {index}: intersection {intersection:g} and union {union:g} are not pixel counts: they must "
                "be whole numbers with 0 <= intersection <= union"
            )
    intersections, unions = [int(i) for i in intersections], [int(u) for u in unions]
    ious = sample_ious(intersections, unions, empty_target_iou)

    def summary(indices) -> dict:
        total = _iou(sum(intersections[i] for i in indices), sum(unions[i] for i in indices), empty_target_iou)
        return {"gIoU": float(np.mean([ious[i] for i in indices])), "cIoU": total}

    results = summary(range(len(intersections)))
    if task_ids is not None:
        samples_of_task = defaultdict(list)
        for index, task in enumerate(task_ids):
            samples_of_task[task].append(index)
        per_task = {
            task: {**summary(indices), "num_samples": len(indices)} for task, indices in samples_of_task.items()
        }
        results["mIoU_tasks"] = float(np.mean([scores["cIoU"] for scores in per_task.values()]))
        results["per_task"] = per_task
    return results


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, groups, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(groups, weights=ranks)
    return sums[groups] / counts[groups]


def spearman_correlation(x: Sequence[Real], y: Sequence[Real]) -> float | None:
    """Spearman's rank correlation of `x` and `y`: the Pearson correlation of their ranks, tied values sharing the mean
    of their ranks. `None` when it is undefined (fewer than two values, or either side constant). Raises `ValueError`
    for sequences of different lengths or values that are not finite."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-D sequences of the same length, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spearman_correlation needs finite values (got NaN or infinity)")
    rank_x, rank_y = _average_ranks(x), _average_ranks(y)
    if len(x) < 2 or rank_x.std() == 0 or rank_y.std() == 0:
        return None
    return float(np.corrcoef(rank_x, rank_y)[0, 1])
