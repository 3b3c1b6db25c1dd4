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

# Answers without `[SEG]` for a sample whose target is empty (nothing in the image fits the task); training draws one
# per such sample, as LISA varies its `[SEG]` answers.
NO_TARGET_ANSWERS = (
    "There is nothing in the image that fits.",
    "Nothing in the image fits the task.",
    "Sorry, nothing here fits.",
    "No object in the image fits the task.",
)

# The column of a `[SEG]` cache holding each row's projected `[SEG]` embedding.
SEG_CACHE_COLUMN = "seg_embed"
# What `VLTPProcessor` returns once per row that belongs to the image, not to the task: SAM's pixels and sizes.
SAM_IMAGE_ENTRIES = ("sam_pixel_values", "original_sizes", "reshaped_input_sizes")


def group_rows_by_image(image_ids) -> tuple[list[int], list[int]]:
    """The first row of each image, images in order of their first row, and each row's image as an index into those
    first rows, from one hashable id per row: what lets an image's tasks share its work (its pixels sent once, with
    `image_indices`)."""
    first_rows, position = [], {}
    for row, image in enumerate(image_ids):
        if image not in position:
            position[image] = len(first_rows)
            first_rows.append(row)
    return first_rows, [position[image] for image in image_ids]


class VLTPDataCollator:
    """Rows of the loaders (or of a `[SEG]` cache) -> a batch of model inputs, through [`VLTPProcessor`].

    The prompt is LISA's question (the processor's template, "{task} Please output segmentation mask."). With
    `answers`, each row's answer is one of them, picked from the row's content so that every process, every run and
    every resume picks the same; leave `answers` out for stage 2, which has no text. With `no_target_answers`, a row
    whose target mask is empty is answered with one of those instead (no `[SEG]`: it trains LLaVA's loss only);
    without them every row gets a `[SEG]` answer, as in LISA. `keep_targets` adds each row's mask at its own size
    (`target_masks`) and its `task_ids` for evaluation. Rows of a `[SEG]` cache add `seg_embeds`.

    `group_by_image` (stage 2's training batches) sends SAM's image entries once per image when rows share an image,
    by `image_id`: `sam_pixel_values`, `original_sizes` and `reshaped_input_sizes` then hold one row per image (in
    order of their first row) and `image_indices` gives each row's image, so that `VLTPSamModel` runs the ViT's dense
    prefix once per image. Everything else stays one row per task.
    """

    def __init__(
        self,
        processor: VLTPProcessor,
        answers=None,
        seed: int = 0,
        keep_targets: bool = False,
        no_target_answers=None,
        group_by_image: bool = False,
    ):
        self.processor = processor
        self.answers = list(answers) if answers else None
        self.no_target_answers = list(no_target_answers) if no_target_answers else None
        self.seed = seed
        self.keep_targets = keep_targets
        self.group_by_image = group_by_image

    def answer(self, row: dict) -> str:
        answers = self.answers
        if self.no_target_answers and not np.asarray(row["mask"]).any():
            answers = self.no_target_answers
        key = f"{self.seed}/{row.get('image_id')}/{row.get('task_id')}/{row['task']}".encode()
        return answers[zlib.crc32(key) % len(answers)]

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
        if self.group_by_image:
            self._send_images_once(batch, rows)
        return batch

    @staticmethod
    def _send_images_once(batch: dict, rows: list[dict]) -> None:
        missing = [index for index, row in enumerate(rows) if row.get("image_id") is None]
        if missing:
            raise ValueError(
                f"grouping rows by image needs each row's image_id; rows {missing[:5]} of this batch have none (leave "
                "out group_by_image, or set group_by_image: false in a training config)"
            )
        first_rows, image_indices = group_rows_by_image([row["image_id"] for row in rows])
        if len(first_rows) < len(rows):
            for name in SAM_IMAGE_ENTRIES:
                batch[name] = batch[name][first_rows]
            batch["image_indices"] = torch.tensor(image_indices)


__all__ = ["LISA_ANSWERS", "NO_TARGET_ANSWERS", "SEG_CACHE_COLUMN", "VLTPDataCollator", "group_rows_by_image"]
