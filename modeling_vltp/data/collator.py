"""Rows of the loaders (or of a `[SEG]` cache) -> batches of model inputs, through [`VLTPProcessor`]."""

import zlib

import numpy as np
import torch

from ..processing_vltp import VLTPProcessor

# LISA's answers (`ANSWER_LIST` of LISA's utils); training draws one per sample.
LISA_ANSWERS = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)

# The column of a `[SEG]` cache holding each row's projected `[SEG]` embedding.
SEG_CACHE_COLUMN = "seg_embed"


class VLTPDataCollator:
    """Rows of the loaders (or of a `[SEG]` cache) -> a batch of model inputs, through [`VLTPProcessor`].

    The prompt is LISA's question (the processor's template, "{task} Please output segmentation mask."). With
    `answers`, each row's answer is one of them, picked from the row's content so that every process, every run and
    every resume picks the same; leave `answers` out for stage 2, which has no text. `keep_targets` adds each row's
    mask at its own size (`target_masks`) and its `task_ids` for evaluation. Rows of a `[SEG]` cache add `seg_embeds`.
    """

    def __init__(self, processor: VLTPProcessor, answers=None, seed: int = 0, keep_targets: bool = False):
        self.processor = processor
        self.answers = list(answers) if answers else None
        self.seed = seed
        self.keep_targets = keep_targets

    def answer(self, row: dict) -> str:
        key = f"{self.seed}/{row.get('image_id')}/{row.get('task_id')}/{row['task']}".encode()
        return self.answers[zlib.crc32(key) % len(self.answers)]

    def __call__(self, rows: list[dict]) -> dict:
        batch = dict(
            self.processor(
                images=[row["image"].convert("RGB") for row in rows],
                tasks=[row["task"] for row in rows],
                answers=[self.answer(row) for row in rows] if self.answers else None,
                masks=[row["mask"] for row in rows],
            )
        )
        if SEG_CACHE_COLUMN in rows[0]:
            batch["seg_embeds"] = torch.tensor(np.array([row[SEG_CACHE_COLUMN] for row in rows]), dtype=torch.float32)
        if self.keep_targets:
            batch["target_masks"] = [np.asarray(row["mask"], dtype=bool) for row in rows]
            batch["task_ids"] = torch.tensor([row.get("task_id", -1) for row in rows])
        return batch


__all__ = ["LISA_ANSWERS", "SEG_CACHE_COLUMN", "VLTPDataCollator"]
