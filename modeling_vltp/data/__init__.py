"""Task-oriented segmentation data: RIO and COCO-Tasks loaders, the encoded-mask helpers and the collator.

The synthetic task world lives in :mod:`modeling_vltp.data.synthetic`.
"""

from .coco_tasks import COCO_TASKS_NAMES, COCO_TASKS_TEMPLATE, TASK_NAME_SETS, load_coco_tasks, resolve_task_names
from .collator import LISA_ANSWERS, VLTPDataCollator
from .masks import decode_mask, decode_mask_batch
from .records import FEATURES
from .rio import RIO_SPLITS, load_rio

__all__ = [
    "COCO_TASKS_NAMES",
    "COCO_TASKS_TEMPLATE",
    "FEATURES",
    "LISA_ANSWERS",
    "RIO_SPLITS",
    "TASK_NAME_SETS",
    "VLTPDataCollator",
    "decode_mask",
    "decode_mask_batch",
    "load_coco_tasks",
    "load_rio",
    "resolve_task_names",
]
