"""``evaluate`` module for task-oriented segmentation IoU: gIoU, cIoU and the task-averaged cIoU.

``evaluate`` copies this file into its cache before importing it, so the computation is imported from
the installed ``modeling_vltp`` package rather than relative to this file.
"""

import datasets
import evaluate

from modeling_vltp.metrics import compute_tos_metrics

_DESCRIPTION = """\
IoU metrics of RIO / COCO-Tasks as LISA and VLTP report them: gIoU (mean per-sample IoU), cIoU (total
intersection over total union) and, given task ids, mIoU_tasks (the mean over tasks of each task's cIoU).
A sample with an empty target and an empty prediction scores `empty_target_iou` (default 1.0).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: 2-D binary masks (bool or 0/1), one per sample; sizes may differ between samples.
    references: target masks of the same shapes.
    task_ids: optional task of each sample; adds `mIoU_tasks` and `per_task`.
    empty_target_iou: IoU of a sample whose target and prediction are both empty (default 1.0).
Returns:
    dict with `gIoU`, `cIoU` and, given task ids, `mIoU_tasks` and `per_task`.
Example:
    >>> metric = evaluate.load(modeling_vltp.metrics.tos_metric_path())
    >>> metric.compute(predictions=[[[1, 0], [0, 0]]], references=[[[1, 1], [0, 0]]])
    {'gIoU': 0.5, 'cIoU': 0.5}
"""

_CITATION = """\
@inproceedings{chen2025vltp,
  title={VLTP: Vision-Language Guided Token Pruning for Task-Oriented Segmentation},
  author={Chen, Hanning and others},
  booktitle={IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},
  year={2025},
  note={arXiv:2409.08464}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TosIoU(evaluate.Metric):
    def _info(self):
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("uint8")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
        )

    def _compute(self, predictions, references, task_ids=None, empty_target_iou=1.0):
        return compute_tos_metrics(predictions, references, task_ids=task_ids, empty_target_iou=empty_target_iou)
