"""Task-oriented segmentation data: RIO and COCO-Tasks loaders and the encoded-mask helpers.

The synthetic task world lives in :mod:`modeling_vltp.data.synthetic`.
"""

from .coco_tasks import COCO_TASKS_NAMES, COCO_TASKS_TEMPLATE, load_coco_tasks
from .masks import decode_mask, decode_mask_batch
from .records import FEATURES
from .rio import RIO_SPLITS, load_rio

__all__ = [
    "COCO_TASKS_NAMES",
    "COCO_TASKS_TEMPLATE",
    "FEATURES",
    "RIO_SPLITS",
    "decode_mask",
    "decode_mask_batch",
    "load_coco_tasks",
    "load_rio",
]
