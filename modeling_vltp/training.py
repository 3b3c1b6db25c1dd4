"""Finetuning VLTP with the Hugging Face `Trainer`, in the paper's two stages.

Stage 1, vision-language finetuning (paper Sec. 5.2, LISA's recipe): LoRA through peft on the LLaVA language model's
`q_proj`/`v_proj`; the projection `text_hidden_fcs`, SAM's mask decoder and the embedding and output rows of the new
tokens (`[SEG]`, `<image>`) are trained; LLaVA's vision tower and projector and all of SAM's ViT (prune decoder
included) stay frozen. SAM's ViT runs densely. Loss: LM cross-entropy + mask BCE + Dice (weights 1 / 2 / 0.5 from the
model config) + SAM's IoU loss (`iou_loss_weight`). A sample whose target is empty is answered, by default, with a
sentence without `[SEG]` (`empty_targets`, `no_target_answers`), which trains the LM loss only. The adapter is merged
at the end, so the output is a plain VLTP checkpoint.

Stage 2, VLTP@Finetune (Sec. 4.3 and 5.3, Eq. 12): the prune decoder and the mask decoder are trained at the given
pruning rates with LLaVA and the ViT frozen; loss L_X + L_P + SAM's IoU loss. As LLaVA is frozen, one pass first
stores every sample's projected `[SEG]` embedding in a `datasets` cache ([`build_seg_cache`]); stage 2 then trains
[`VLTPSamModel`] (the SAM side only) from that cache without loading LLaVA, and writes its weights back into a
full checkpoint. With `empty_targets: answer_nothing` (the default) it trains on the samples with a non-empty target
only: LLaVA answers the others without `[SEG]`, so at inference they never reach SAM. Starting
from a stage-2 checkpoint with other rates finetunes for the new rates (Table 4); the cache stays valid, since stage 2
never changes LLaVA or `text_hidden_fcs`.

Both stages evaluate with teacher forcing of LISA's validation answer: gIoU and cIoU at each image's own size (as
LISA and VLTP report them) and the GMACs of the ViT at the rates trained. Everything runs under `accelerate launch`
(DDP, DeepSpeed, FSDP). `vltp train --stage 1|2 --config FILE.yaml` drives it from the command line
(see `docs/training.md`).
"""

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
import types
import typing
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from datasets import Dataset, DatasetDict, load_from_disk
from safetensors.torch import load_file, save_file
from transformers import EvalPrediction, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import seed_worker

from .configuration_vltp import VLTPConfig, VLTPVisionConfig, check_prune_rates, check_prune_temperature
from .data import load_coco_tasks, load_rio, resolve_task_names
from .data.collator import (
    LISA_ANSWERS,
    NO_TARGET_ANSWERS,
    SEG_CACHE_COLUMN,
    VLTPDataCollator,
    group_rows_by_image,
)
from .data.masks import decode_mask_batch, has_target
from .flops import vision_gmacs
from .metrics import sample_ious, spearman_correlation, tos_metrics_from_counts
from .modeling_vltp import VLTPForTaskSegmentation, VLTPSamModel, weighted_loss
from .processing_vltp import DEFAULT_ANSWER, VLTPProcessor
from .staging import staged_output

# LISA's optimisation settings (train_ds.py): AdamW with betas (0.9, 0.95), no weight decay, lr 3e-4 with 100 warmup
# steps then linear decay, gradient clipping at 1, batch 2 per device with 10 accumulation steps. A config's
# `training:` section overrides them.
STAGE1_TRAINING_DEFAULTS = {
    "learning_rate": 3e-4,
    "adam_beta2": 0.95,
    "weight_decay": 0.0,
    "warmup_steps": 100,
    "lr_scheduler_type": "linear",
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 10,
}

_SEG_CACHE_INFO = "vltp_seg_cache.json"
# What a run was started with (settings, model and data fingerprints) and the checkpoints it completed, in output_dir.
RUN_RECORD = "vltp_run.json"
# Settings a resumed run may change: they change neither the data, the model nor the optimisation.
RESUMABLE_SETTINGS = frozenset(
    {"model", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "source", "cache_batch_size"}
    | {
        f"training.{name}"
        for name in (
            "logging_steps",
            "logging_strategy",
            "logging_first_step",
            "save_steps",
            "save_strategy",
            "save_total_limit",
            "report_to",
            "disable_tqdm",
            "dataloader_num_workers",
            "eval_steps",
            "eval_strategy",
            "per_device_eval_batch_size",
            "run_name",
        )
    }
)

logger = logging.getLogger(__name__)

STAGE1_LOSSES = ("lm_loss", "mask_bce_loss", "mask_dice_loss", "iou_loss")
STAGE2_LOSSES = ("mask_bce_loss", "mask_dice_loss", "prune_loss", "iou_loss")
# How stage 1 answers a sample whose target is empty: with one of `no_target_answers` (no `[SEG]`, LM loss only), or
# with a `[SEG]` answer trained towards the empty mask (LISA).
EMPTY_TARGET_CHOICES = ("answer_nothing", "seg")
STAGE1_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "sam_pixel_values",
    "labels",
    "masks",
    "reshaped_input_sizes",
)
STAGE2_INPUTS = ("sam_pixel_values", "seg_embeds", "masks", "reshaped_input_sizes", "image_indices")


class TrainingInputError(ValueError):
    """Bad input found before training starts. The message is one line naming the file and the field."""


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DataSettings:
    """Where the samples come from: a RIO or COCO-Tasks layout (real or synthetic, see `docs/data.md`).

    `annotations` is RIO's split file or folder, or COCO-Tasks' annotation folder; `images` the COCO 2014 root.
    `tasks` picks COCO-Tasks task numbers; `task_names` is a list of names or the name of a set of
    `data.TASK_NAME_SETS` (e.g. `"synthetic"`).
    `max_train_samples` / `max_eval_samples` keep the first samples only.
    """

    format: str
    annotations: str
    images: str
    train_split: str = "train"
    eval_split: str | None = None
    tasks: list[int] | None = None
    task_names: list[str] | str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class LoraSettings:
    """LoRA on the language model (LISA: r 8, alpha 16, dropout 0.05 on `q_proj` and `v_proj`)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainConfig:
    """One `vltp train` run, as read from its YAML file (schema in `docs/training.md`).

    `model` is a local VLTP checkpoint with its processor: the system to finetune in stage 1, a stage-1 (or earlier
    stage-2) output in stage 2. `prune_rates` (stage 2) gives one rate per pruning stage; `prune_temperature` (stage 2)
    sets the model's `vision_config.prune_temperature` (Eq. 11's smoothing) for the run; `seg_cache` (stage 2) is the
    folder of the `[SEG]` cache, built there from `model` when absent; `group_by_image` (stage 2) keeps each image's
    rows in one training batch ([`ImageBatchSampler`]), so that its tasks share the ViT's dense prefix. `training`
    holds `TrainingArguments` fields.
    A non-empty `output_dir` is refused unless the run resumes (`resume_from_checkpoint`) or `overwrite_output_dir`
    is set; files a run did not write are never deleted.
    """

    stage: int
    model: str
    output_dir: str
    data: DataSettings
    training: dict = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    answers: list[str] = field(default_factory=lambda: list(LISA_ANSWERS))
    empty_targets: str = "answer_nothing"
    no_target_answers: list[str] = field(default_factory=lambda: list(NO_TARGET_ANSWERS))
    prune_rates: list[float] | None = None
    prune_temperature: float | None = None
    seg_cache: str | None = None
    train_mask_decoder: bool = True
    group_by_image: bool = True
    cache_batch_size: int = 8
    resume_from_checkpoint: bool | str | None = None
    overwrite_output_dir: bool = False
    source: str = "<config>"

    @classmethod
    def from_yaml(cls, path, stage: int) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise TrainingInputError(f"config file not found: {path}")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise TrainingInputError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(content, dict):
            raise TrainingInputError(f"{path}: expected a mapping of settings, got {type(content).__name__}")
        return cls.from_dict(content, stage, source=str(path))

    @classmethod
    def from_dict(cls, content: dict, stage: int, source: str = "<config>") -> "TrainConfig":
        """Build and check a config; relative paths are taken from the config file's folder."""
        if stage not in (1, 2):
            raise TrainingInputError(f"{source}: stage must be 1 or 2, got {stage}")
        content = dict(content)
        base = Path(source).parent if source != "<config>" else Path(".")
        data = _settings(DataSettings, content.pop("data", None), source, "data.")
        lora = _settings(LoraSettings, content.pop("lora", {}), source, "lora.")
        top = _settings(cls, content, source, "", internal={"stage", "data", "lora", "source"})
        config = cls(stage=stage, data=DataSettings(**data), lora=LoraSettings(**lora), source=source, **top)
        config.model = str(_resolve(base, config.model))
        config.output_dir = str(_resolve(base, config.output_dir))
        config.data.annotations = str(_resolve(base, config.data.annotations))
        config.data.images = str(_resolve(base, config.data.images))
        if config.seg_cache is not None:
            config.seg_cache = str(_resolve(base, config.seg_cache))
        if isinstance(config.resume_from_checkpoint, str):
            config.resume_from_checkpoint = str(_resolve(base, config.resume_from_checkpoint))
        return config

    def error(self, field_name: str, reason: str) -> TrainingInputError:
        return TrainingInputError(f"{self.source}: field '{field_name}': {reason}")


def _resolve(base: Path, path: str) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def _settings(cls, content, source: str, prefix: str, internal: frozenset | set = frozenset()) -> dict:
    """The fields of dataclass `cls` (less the `internal` ones) found in `content`, type-checked; unknown or missing
    fields are errors."""
    if not isinstance(content, dict):
        raise TrainingInputError(f"{source}: field '{prefix.rstrip('.') or 'config'}': expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in internal}
    unknown = sorted(set(content) - set(fields))
    if unknown:
        raise TrainingInputError(f"{source}: unknown field '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    values = {}
    for name, spec in fields.items():
        if name not in content:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise TrainingInputError(f"{source}: field '{prefix}{name}': missing")
            continue
        values[name] = _check_type(content[name], spec.type, f"{source}: field '{prefix}{name}'")
    return values


def _check_type(value, annotation, where: str):
    """`value` if it fits `annotation` (int, float, str, bool, dict, list[...] or a union of them); YAML reads `3e-4`
    as a string, so strings are accepted as floats."""
    options = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if getattr(option, "__origin__", None) is list and isinstance(value, list):
            (item_type,) = option.__args__
            return [_check_type(item, item_type, where) for item in value]
        if (
            option in (int, str, bool, dict)
            and isinstance(value, option)
            and not (option is int and isinstance(value, bool))
        ):
            return value
    raise TrainingInputError(f"{where}: expected {annotation}, got {value!r:.60}")


def training_arguments(config: TrainConfig, **overrides) -> TrainingArguments:
    """`TrainingArguments` of a run: the stage's defaults, then the config's `training:` section, then `overrides`."""
    defaults = dict(STAGE1_TRAINING_DEFAULTS) if config.stage == 1 else {}
    # The collators read the loaders' columns (image, task, mask), which are not arguments of the model's forward.
    # Frozen parts of the mask decoder (its multimask outputs) get no gradient, which DDP must be told about.
    defaults.update(remove_unused_columns=False, ddp_find_unused_parameters=True)
    settings = {**defaults, **config.training, **overrides}
    if settings.get("gradient_checkpointing") and "gradient_checkpointing_kwargs" not in settings:
        # Non-reentrant checkpointing lets gradients reach LoRA weights behind frozen embeddings.
        settings["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    hints = typing.get_type_hints(TrainingArguments)
    for name, value in settings.items():
        if name not in known:
            raise config.error(f"training.{name}", "not a field of transformers.TrainingArguments")
        if name == "output_dir":
            raise config.error("training.output_dir", "give the output directory as the top-level 'output_dir'")
        settings[name] = _training_value(config, name, value, hints[name])
    _check_training_values(config, settings)
    try:
        args = TrainingArguments(output_dir=config.output_dir, **settings)
    except (ValueError, TypeError) as error:
        raise config.error("training", " ".join(str(error).split())) from None
    from transformers.integrations import get_available_reporting_integrations

    installed = get_available_reporting_integrations()
    missing = [name for name in args.report_to if name not in installed]
    if missing:
        raise config.error(
            "training.report_to", f"{missing[0]} is not installed (installed: {', '.join(installed) or 'none'})"
        )
    return args


def _training_value(config: TrainConfig, name: str, value, hint):
    """`value` checked against a `TrainingArguments` field of type int, float or bool (optional or not); floats may
    be written as strings (YAML reads `3e-4` as one) and must be finite."""
    options = set(hint.__args__) if isinstance(hint, types.UnionType) else {hint}
    if value is None and type(None) in options:
        return value
    if options - {type(None)} == {int} and (not isinstance(value, int) or isinstance(value, bool)):
        raise config.error(f"training.{name}", f"expected an integer, got {value!r:.60}")
    if options - {type(None)} == {bool} and not isinstance(value, bool):
        raise config.error(f"training.{name}", f"expected true or false, got {value!r:.60}")
    if float in options and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise config.error(f"training.{name}", f"expected a number, got {value!r:.60}") from None
        if not math.isfinite(number):
            raise config.error(f"training.{name}", f"expected a finite number, got {value!r:.60}")
        return number
    return value


def _check_training_values(config: TrainConfig, settings: dict) -> None:
    """The ranges `TrainingArguments` leaves to the Trainer, and evaluation settings that need an evaluation split."""
    minimums = {
        "per_device_train_batch_size": 1,
        "per_device_eval_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 0,
        "weight_decay": 0,
    }
    for name, minimum in minimums.items():
        if name in settings and settings[name] < minimum:
            raise config.error(f"training.{name}", f"must be at least {minimum}, got {settings[name]}")
    for name in ("learning_rate", "num_train_epochs"):
        if name in settings and settings[name] <= 0:
            raise config.error(f"training.{name}", f"must be positive, got {settings[name]}")
    if "max_steps" in settings and settings["max_steps"] != -1 and settings["max_steps"] < 1:
        raise config.error(
            "training.max_steps", f"must be at least 1 (or -1: num_train_epochs), got {settings['max_steps']}"
        )
    if not config.data.eval_split:
        for name in ("eval_strategy", "load_best_model_at_end", "metric_for_best_model"):
            if settings.get(name) not in (None, False, "no"):
                raise config.error(f"training.{name}", "needs an evaluation split: set data.eval_split")


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def load_split(data: DataSettings, split: str, max_samples: int | None = None, source: str = "<config>") -> Dataset:
    """One split of the configured data as the loaders return it (rows with `image`, `task`, `mask`, ...).

    Raises [`TrainingInputError`] for a missing file, a malformed record or a split whose targets are all empty.
    """
    if data.format not in ("rio", "coco_tasks"):
        raise TrainingInputError(f"{source}: field 'data.format': expected 'rio' or 'coco_tasks', got {data.format!r}")
    try:
        if data.format == "rio":
            dataset = load_rio(data.annotations, data.images, split)
        else:
            names = resolve_task_names(data.task_names)
            dataset = load_coco_tasks(data.annotations, data.images, split, tasks=data.tasks, task_names=names)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingInputError(f"{source}: data ({data.format}, split {split!r}): {error}") from None
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise TrainingInputError(f"{source}: data ({data.format}, split {split!r}): no samples")
    if not any(has_target(mask) for mask in dataset.with_format(None)["mask"]):
        raise TrainingInputError(
            f"{source}: data ({data.format}, split {split!r}): no target masks, every sample's mask is empty"
        )
    return dataset


def with_targets(dataset: Dataset) -> Dataset:
    """The rows of a loaded split (or `[SEG]` cache) whose target is not empty, read without decoding any mask."""
    encoded = dataset.with_format(None)["mask"]
    return dataset.select([row for row, mask in enumerate(encoded) if has_target(mask)])


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def _first_seg_rows(seg_sample_indices) -> dict[int, int]:
    """sample -> the row of its first `[SEG]` in `seg_sample_indices`: the mask (and score) a sample is judged by."""
    first = {}
    for row, sample in enumerate(seg_sample_indices.tolist()):
        first.setdefault(sample, row)
    return first


def mask_overlaps(processor: VLTPProcessor, pred_masks, seg_sample_indices, batch: dict) -> torch.Tensor:
    """(B, 2) intersection and union, in pixels at each image's own size, of each sample's predicted mask (its first
    `[SEG]`'s; empty without one) and its target `batch["target_masks"]`."""
    masks = {}
    first = _first_seg_rows(seg_sample_indices)
    if first:
        samples, rows = list(first), list(first.values())
        resized = processor.post_process_masks(
            pred_masks.detach()[rows].float().cpu(),
            batch["original_sizes"].cpu()[samples],
            batch["reshaped_input_sizes"].cpu()[samples],
        )
        masks = {sample: mask.numpy() for sample, mask in zip(samples, resized)}
    return _overlaps(
        [masks.get(sample, np.zeros_like(target)) for sample, target in enumerate(batch["target_masks"])],
        batch["target_masks"],
    )


def _first_seg_scores(iou_scores, seg_sample_indices, num_samples: int) -> torch.Tensor:
    """(B,) float64 score of each sample's first `[SEG]` mask (the one [`mask_overlaps`] scores), NaN without one."""
    scores = torch.full((num_samples,), float("nan"), dtype=torch.float64)
    first = _first_seg_rows(seg_sample_indices)
    scores[list(first)] = iou_scores.detach()[list(first.values())].double().cpu()
    return scores


def _overlaps(predictions, targets) -> torch.Tensor:
    """(B, 2) pixel intersection and union of each boolean prediction with its boolean target."""
    counts = [
        ((predicted & target).sum(), (predicted | target).sum()) for predicted, target in zip(predictions, targets)
    ]
    return torch.tensor(counts, dtype=torch.int64)


class TOSMetrics:
    """`compute_metrics` for [`VLTPTrainer`]: gIoU, cIoU and task-averaged cIoU from the per-sample overlaps that
    `prediction_step` returns, plus the ViT's GMACs at the rates evaluated."""

    def __init__(self, vision_config: VLTPVisionConfig, prune_rates):
        self.gmacs = vision_gmacs(vision_config, prune_rates)

    def __call__(self, prediction: EvalPrediction) -> dict:
        counts = np.asarray(prediction.predictions)
        scores = tos_metrics_from_counts(counts[:, 0], counts[:, 1], prediction.label_ids)
        return {**{k: v for k, v in scores.items() if k != "per_task"}, "gmacs": self.gmacs}


# --------------------------------------------------------------------------------------------------------------------
# Batches that hold whole images
# --------------------------------------------------------------------------------------------------------------------


def image_batches(image_ids, batch_size: int, order=None) -> list[list[int]]:
    """Row indices in batches of at most `batch_size` rows that hold whole images, so that an image's tasks share its
    work: each image's rows together (an image with more rows than `batch_size` fills batches of its own), the images
    in order of their first row, or in `order` (every image id once). `image_ids` holds one hashable id per row."""
    rows_of = defaultdict(list)
    for row, image in enumerate(image_ids):
        rows_of[image].append(row)
    if order is not None and (len(order) != len(rows_of) or set(order) != rows_of.keys()):
        raise ValueError(f"order must name each of the {len(rows_of)} images once, got {len(order)} entries")
    batches, current = [], []
    for image in rows_of if order is None else order:
        rows = rows_of[image]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if len(current) + len(chunk) > batch_size:
                batches.append(current)
                current = []
            current += chunk
    return batches + [current] if current else batches


class ImageBatchSampler(torch.utils.data.Sampler):
    """Stage 2's training batches: at most `batch_size` rows each, holding whole images ([`image_batches`]), so that
    an image's tasks share the ViT's dense prefix. Each epoch every row comes once, in an order drawn from `seed` and
    the epoch (see `set_epoch`): the images by decreasing number of rows, those with as many rows in random order, then
    the batches shuffled. Ordering by row count keeps the number of batches the same in every epoch, which the Trainer
    counts once.

    Under accelerate every process builds the same batches and `BatchSamplerShard` deals them out, batch i to process
    i mod n (an epoch whose batches do not divide evenly repeats its first ones, as with any sampler). `batch_size` is
    `None` to tell it that the batches vary in size; `max_rows` is the limit.
    """

    def __init__(self, image_ids, batch_size: int, seed: int = 0):
        super().__init__()
        image_ids = list(image_ids)
        missing = [row for row, image in enumerate(image_ids) if image is None]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(image_ids)} rows have no image_id (the first: row {missing[0]}); batches "
                "grouped by image need one per row"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.image_ids, self.max_rows, self.seed, self.epoch = image_ids, batch_size, seed, 0
        self.batch_size = None
        self.rows_per_image = Counter(image_ids)
        self.num_batches = len(self.batches(0))

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order `__iter__` gives; the Trainer sets it before each epoch."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The row indices of each batch of `epoch`, in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        images = list(self.rows_per_image)
        shuffled = [images[index] for index in rng.permutation(len(images))]
        order = sorted(shuffled, key=self.rows_per_image.__getitem__, reverse=True)  # stable: ties stay shuffled
        batches = image_batches(self.image_ids, self.max_rows, order)
        return [batches[index] for index in rng.permutation(len(batches))]

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return self.num_batches


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class VLTPTrainer(Trainer):
    """`Trainer` for both stages.

    The loss is the weighted sum (weights from the model config) of the parts named in `losses`: stage 1 leaves out
    the pruning loss, since its ViT runs densely and its prune decoder is frozen. The model receives only the batch
    entries named in `input_names`, with `prune_rates`. Evaluation returns, per sample, the pixel intersection and
    union of its mask (see [`mask_overlaps`]) as predictions and its task id as label, for [`TOSMetrics`]; its
    batches come from `eval_data_collator` (teacher-forced validation answer, targets kept) when given. With
    `train_batch_sampler` (an [`ImageBatchSampler`]) the training batches are its batches, not the Trainer's shuffled
    rows.
    """

    def __init__(
        self,
        *args,
        losses,
        input_names,
        prune_rates,
        eval_data_collator=None,
        train_batch_sampler: ImageBatchSampler | None = None,
        run_record: Path | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.run_record = run_record
        self.train_batch_sampler = train_batch_sampler
        self.eval_data_collator = eval_data_collator
        self.losses = tuple(losses)
        self.input_names = tuple(input_names)
        self.prune_rates = list(prune_rates)
        # The losses are per-batch means: let the Trainer average them over gradient-accumulation steps.
        self.model_accepts_loss_kwargs = False

    def get_train_dataloader(self):
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        args = self.args
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            worker_init_fn=functools.partial(
                seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # The Trainer's own `set_epoch` calls miss this sampler when accelerate has both sharded it (several processes)
        # and wrapped it to skip the batches done (a run resumed in the middle of an epoch).
        if self.train_batch_sampler is not None:
            self.train_batch_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _config(self) -> VLTPConfig:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model().config if hasattr(model, "get_base_model") else model.config

    def weighted_loss(self, outputs) -> torch.Tensor:
        """The model's `weighted_loss` of this stage's loss parts (`losses`)."""
        return weighted_loss(self._config(), {name: getattr(outputs, name) for name in self.losses})

    def _forward(self, model, inputs):
        model_inputs = {name: inputs[name] for name in self.input_names if name in inputs}
        return model(**model_inputs, prune_rates=self.prune_rates)

    def _save_checkpoint(self, model, trial):
        """With a `run_record`, list each checkpoint's files there once its save is complete, and rotate
        (`save_total_limit`) only the checkpoints listed, deleting only the files listed: checkpoints of other runs,
        and files others put into this run's, are never deleted."""
        if self.run_record is None:
            return super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        before = _file_stamps(folder)
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if not self.args.should_save:
            return
        record = json.loads(self.run_record.read_text())
        written = [name for name, stamp in _file_stamps(folder).items() if before.get(name) != stamp]
        record["checkpoints"][folder.name] = sorted(written)
        own = sorted(record["checkpoints"], key=lambda name: _checkpoint_step(Path(name)))
        best = self.state.best_model_checkpoint
        keep = {own[-1]} | ({Path(best).name} if best else set())
        excess = len(own) - max(limit, len(keep)) if limit and limit > 0 else 0
        for name in own:
            if excess <= 0:
                break
            if name not in keep:
                _delete_written(folder.parent / name, record["checkpoints"].pop(name))
                excess -= 1
        self.run_record.write_text(json.dumps(record, indent=2))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = self._forward(model, inputs)
        loss = self.weighted_loss(outputs)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = self._forward(model, inputs)
            loss = self.weighted_loss(outputs).detach()
        if prediction_loss_only:
            return loss, None, None
        overlaps = mask_overlaps(self.processing_class, outputs.pred_masks, outputs.seg_sample_indices, inputs)
        return loss, overlaps.to(loss.device), inputs["task_ids"]


def _file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under `folder`, by relative path."""
    if not folder.is_dir():
        return {}
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


def _delete_written(folder: Path, files: list[str]) -> None:
    """Delete the listed files of a rotated checkpoint, then its emptied folders; keep anything else."""
    for name in files:
        (folder / name).unlink(missing_ok=True)
    for directory in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [folder]:
        with contextlib.suppress(OSError):
            directory.rmdir()
    if folder.exists():
        others = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        logger.warning(f"kept {folder} (save_total_limit): it holds files this run did not write: {', '.join(others)}")


@dataclass
class TrainSummary:
    """What a run did: where the model went, its steps, final training loss, evaluation metrics and time."""

    stage: int
    output_dir: str
    num_processes: int
    global_step: int
    train_loss: float | None
    eval_metrics: dict
    prune_rates: list[float]
    seconds: float

    def lines(self) -> list[str]:
        processes = f" on {self.num_processes} processes" if self.num_processes > 1 else ""
        lines = [f"stage {self.stage} done in {self.seconds:.1f} s{processes}: {self.global_step} steps"]
        if self.train_loss is not None:
            lines[0] += f", training loss {self.train_loss:.4f}"
        if self.eval_metrics:
            metrics = self.eval_metrics
            lines.append(
                f"evaluation at rates {self.prune_rates}: gIoU {100 * metrics['eval_gIoU']:.1f}  "
                f"cIoU {100 * metrics['eval_cIoU']:.1f}  GMACs {metrics['eval_gmacs']:.3g}"
            )
        lines.append(f"model -> {self.output_dir}")
        return lines


# --------------------------------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------------------------------


def new_token_ids(processor: VLTPProcessor) -> list[int]:
    """The vocabulary rows VLTP adds: `[SEG]` and `<image>`."""
    return [processor.seg_token_id, processor.image_token_id]


def prepare_stage1_model(model: VLTPForTaskSegmentation, processor: VLTPProcessor, lora: LoraSettings):
    """Wrap `model` for stage 1 with peft: LoRA on the language model's `lora.target_modules`; `text_hidden_fcs` and
    `mask_decoder` fully trained; the embedding (and, if untied, output) rows of the new tokens trained through peft's
    trainable tokens. Everything else is frozen. Returns the `PeftModel`."""
    from peft import LoraConfig, get_peft_model

    token_ids = new_token_ids(processor)
    trainable_tokens = {"embed_tokens": token_ids}
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        trainable_tokens["lm_head"] = token_ids
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        target_modules=rf"llava\.model\.language_model\..*\.({'|'.join(lora.target_modules)})",
        modules_to_save=["text_hidden_fcs", "mask_decoder"],
        trainable_token_indices=trainable_tokens,
    )
    return get_peft_model(model, peft_config)


@contextlib.contextmanager
def outside_deepspeed():
    """Build models as plain modules while transformers' DeepSpeed config is active: under ZeRO-3, `from_pretrained`
    would otherwise build them inside `zero.Init`, a collective that hangs when one process builds alone (the
    export and the `[SEG]`-cache pass run on the main process only)."""
    from transformers.integrations import deepspeed

    active = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = active


def merge_stage1(base_model: str, adapter_dir: str, output_dir: str) -> VLTPForTaskSegmentation:
    """Load `base_model`, apply the stage-1 adapter of `adapter_dir`, merge it and save the plain VLTP checkpoint and
    the processor to `output_dir` (as LISA's merge script does)."""
    from peft import PeftModel

    with outside_deepspeed():  # a plain model: peft's ZeRO-3 code paths must not apply to it either
        model = VLTPForTaskSegmentation.from_pretrained(base_model)
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    VLTPProcessor.from_pretrained(base_model).save_pretrained(output_dir)
    return merged


def train_stage1(config: TrainConfig, callbacks=None) -> TrainSummary:
    """Stage 1 from a checked `TrainConfig` (see [`check_config`]); writes the merged model to `config.output_dir`."""
    start = time.monotonic()
    train_set, eval_set, record = check_config(config)
    args = training_arguments(config)
    record_path = _start_run(config, args, record)
    processor = VLTPProcessor.from_pretrained(config.model)
    model = VLTPForTaskSegmentation.from_pretrained(config.model)
    # Seeded right before LoRA's initialisation: under ZeRO-3, building the model inside `zero.Init` uses the RNG.
    set_seed(args.seed)
    model = prepare_stage1_model(model, processor, config.lora)
    dense = [0.0] * len(model.config.vision_config.prune_layers)
    trainer = VLTPTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=VLTPDataCollator(
            processor,
            config.answers,
            seed=args.seed,
            no_target_answers=config.no_target_answers if config.empty_targets == "answer_nothing" else None,
        ),
        eval_data_collator=VLTPDataCollator(processor, [DEFAULT_ANSWER], keep_targets=True),
        processing_class=processor,
        compute_metrics=TOSMetrics(model.config.vision_config, dense),
        callbacks=callbacks,
        losses=STAGE1_LOSSES,
        input_names=STAGE1_INPUTS,
        prune_rates=dense,
        run_record=record_path,
    )
    return _run(
        trainer,
        config,
        dense,
        start,
        "adapter",
        lambda adapter: merge_stage1(config.model, adapter, config.output_dir),
    )


# --------------------------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------------------------


def seg_embeddings_by_batch(
    model: VLTPForTaskSegmentation, dataset: Dataset, collator, batch_size: int, desc: str, batches=None
):
    """Batches of `dataset` as `collator` makes them (teacher-forced), each with the projected `[SEG]` states of its
    LLaVA pass: yields (batch, embeddings (S, guidance_dim), the sample of each (S,)). The batches are `batch_size`
    rows in order, or the lists of row indices `batches`. A progress bar says `desc` (on process 0 only)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = model.device
    loader = (
        DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
        if batches is None
        else DataLoader(dataset, batch_sampler=batches, collate_fn=collator)
    )
    for batch in tqdm(loader, desc=desc, disable=distributed_process()[0] != 0):
        with torch.no_grad():
            _, seg_embeds, samples = model.seg_embeddings(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["pixel_values"].to(device, model.dtype),
            )
        yield batch, seg_embeds, samples


def build_seg_cache(
    model: VLTPForTaskSegmentation,
    processor: VLTPProcessor,
    splits: dict[str, Dataset],
    path,
    batch_size: int = 8,
    info: dict | None = None,
) -> DatasetDict:
    """One teacher-forced pass (LISA's validation answer) over every split: saves the rows with their projected
    `[SEG]` embedding (column `seg_embed`) as a `DatasetDict` at `path`, with `info` in `vltp_seg_cache.json`.

    The cache is written through [`staged_output`], so an interrupted pass leaves no cache that looks valid.
    """
    path = Path(path)
    model.eval()
    collator = VLTPDataCollator(processor, [DEFAULT_ANSWER])
    cache = {}
    for name, dataset in splits.items():
        embeds = []
        for batch, seg, samples in seg_embeddings_by_batch(
            model, dataset, collator, batch_size, f"[SEG] cache, {name}"
        ):
            if samples.tolist() != list(range(len(batch["input_ids"]))):
                raise RuntimeError("expected exactly one [SEG] per teacher-forced sample")
            embeds.append(seg.float().cpu())
        cache[name] = dataset.with_format(None).add_column(SEG_CACHE_COLUMN, torch.cat(embeds).tolist())
    cache = DatasetDict(cache)
    with staged_output(path) as staging:
        cache.save_to_disk(staging)
        (staging / _SEG_CACHE_INFO).write_text(
            json.dumps({"guidance_dim": model.config.vision_config.guidance_dim, **(info or {})}, indent=2)
        )
    return load_seg_cache(path)


def load_seg_cache(path) -> DatasetDict:
    """A cache written by [`build_seg_cache`], its masks decoded when rows are read."""
    cache = load_from_disk(str(path))
    for split in cache.values():
        split.set_transform(decode_mask_batch)
    return cache


def seg_cache_info(config: TrainConfig) -> dict:
    """What a `[SEG]` cache for `config` holds: the model's LLaVA side (fingerprinted: stage 2 never changes it, so a
    cache built from a stage-1 output serves that output's stage-2 runs too), the data settings and the splits."""
    model = Path(config.model)
    vltp_config = json.loads((model / "config.json").read_text())
    data = dataclasses.asdict(config.data)
    if not config.data.eval_split:
        del data["eval_split"], data["max_eval_samples"]
    return {
        "guidance_dim": vltp_config["vision_config"]["guidance_dim"],
        "model": str(model),
        "llava_fingerprint": hashlib.sha256(
            json.dumps(vltp_config["llava_config"], sort_keys=True).encode()
        ).hexdigest()
        + weights_fingerprint(model, ("llava.", "text_hidden_fcs.")),
        "data": data,
        "data_fingerprint": data_fingerprint(config.data),
    }


def _check_seg_cache(config: TrainConfig) -> None:
    """An existing `seg_cache` must have been built for this config's LLaVA side and data; say what differs."""
    path = Path(config.seg_cache)
    stored = _read_record(path / _SEG_CACHE_INFO)
    if stored is None:
        raise config.error(
            "seg_cache",
            f"{path} exists but is not a [SEG] cache (no readable {_SEG_CACHE_INFO}); delete it or name another "
            "folder",
        )
    wanted = seg_cache_info(config)
    if "eval_split" not in wanted["data"]:
        for name in ("eval_split", "max_eval_samples"):
            stored.get("data", {}).pop(name, None)
    differences = record_differences(stored, wanted)
    if differences:
        raise config.error(
            "seg_cache",
            f"{path} was built for other settings (from {stored.get('model')}): {'; '.join(differences[:4])}; "
            "delete it to rebuild it, or name another folder",
        )


def write_back_segmenter(
    segmenter: VLTPSamModel, base_model: str, output_dir: str, prune_rates, processor: VLTPProcessor
) -> None:
    """Save the full checkpoint of `base_model` with the segmenter's weights in place of its own and
    `vision_config.prune_rates` set to `prune_rates` and the segmenter's `prune_temperature`, shard by shard, without
    building LLaVA."""
    base, output = Path(base_model), Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    state = segmenter.state_dict()
    written = set()
    for file in sorted(base.glob("*.safetensors")):
        tensors = load_file(file)
        for name in tensors.keys() & state.keys():
            tensors[name] = state[name].detach().to("cpu", tensors[name].dtype).contiguous()
            written.add(name)
        save_file(tensors, output / file.name, metadata={"format": "pt"})
    missing = set(state) - written - set(segmenter._tied_weights_keys)
    if missing:
        raise RuntimeError(f"{base} has no weight {sorted(missing)[0]!r}: not a VLTP checkpoint of this architecture")
    for index in base.glob("*.safetensors.index.json"):
        shutil.copyfile(index, output / index.name)
    config = VLTPConfig.from_pretrained(base)
    config.vision_config.prune_rates = [float(rate) for rate in prune_rates]
    config.vision_config.prune_temperature = segmenter.config.vision_config.prune_temperature
    config.save_pretrained(output)
    processor.save_pretrained(output)


def train_stage2(config: TrainConfig, callbacks=None) -> TrainSummary:
    """Stage 2 from a checked `TrainConfig`: builds the `[SEG]` cache when absent (the only time LLaVA is loaded),
    trains [`VLTPSamModel`] at `config.prune_rates` and writes the full checkpoint to `config.output_dir`."""
    start = time.monotonic()
    *splits, record = check_config(config)
    args = training_arguments(config)
    record_path = _start_run(config, args, record)
    processor = VLTPProcessor.from_pretrained(config.model)
    with args.main_process_first(desc="[SEG] cache"):
        if not Path(config.seg_cache).exists():
            with outside_deepspeed():
                model = VLTPForTaskSegmentation.from_pretrained(config.model).to(args.device)
            datasets = {name: split for name, split in zip(("train", "eval"), splits) if split is not None}
            info = seg_cache_info(config)
            build_seg_cache(model, processor, datasets, config.seg_cache, config.cache_batch_size, info)
            del model
            gc.collect()
        cache = load_seg_cache(config.seg_cache)
    train_rows = cache["train"]
    if config.empty_targets == "answer_nothing":
        # Stage 1 taught LLaVA to answer these without [SEG], so at inference they never reach SAM.
        train_rows = with_targets(train_rows)
    set_seed(args.seed)
    segmenter = VLTPSamModel.from_pretrained(config.model)
    if config.prune_temperature is not None:
        segmenter.config.vision_config.prune_temperature = config.prune_temperature
    segmenter.requires_grad_(False)
    segmenter.vision_model.prune_decoder.requires_grad_(True)
    segmenter.mask_decoder.requires_grad_(config.train_mask_decoder)
    rates = list(config.prune_rates)
    batch_sampler = None
    if config.group_by_image:  # checked by `check_config`: every row has its image id
        image_ids = train_rows.with_format(None)["image_id"]  # without decoding the masks
        batch_sampler = ImageBatchSampler(image_ids, args.per_device_train_batch_size, args.seed)
    trainer = VLTPTrainer(
        model=segmenter,
        args=args,
        train_dataset=train_rows,
        eval_dataset=cache.get("eval"),
        data_collator=VLTPDataCollator(processor, group_by_image=config.group_by_image),
        eval_data_collator=VLTPDataCollator(processor, keep_targets=True),
        train_batch_sampler=batch_sampler,
        processing_class=processor,
        compute_metrics=TOSMetrics(segmenter.config.vision_config, rates),
        callbacks=callbacks,
        losses=STAGE2_LOSSES,
        input_names=STAGE2_INPUTS,
        prune_rates=rates,
        run_record=record_path,
    )

    def export(trained_dir):
        with outside_deepspeed():
            trained = VLTPSamModel.from_pretrained(trained_dir)
        write_back_segmenter(trained, config.model, config.output_dir, rates, processor)

    return _run(trainer, config, rates, start, "segmenter", export)


# --------------------------------------------------------------------------------------------------------------------
# Both stages
# --------------------------------------------------------------------------------------------------------------------


def check_config(config: TrainConfig) -> tuple[Dataset | None, Dataset | None, dict]:
    """Check everything a run needs before anything is written, raising [`TrainingInputError`]: the model checkpoint,
    the output folder, the settings, the run to resume, the data (loaded and validated) and, in stage 2, the `[SEG]`
    cache and what `group_by_image` needs. Returns the training and evaluation splits (both `None` in stage 2 when
    the cache exists, since the data is then not read) and the run's [`run_record`]; `resume_from_checkpoint: true`
    is resolved to a checkpoint."""
    model_dir = Path(config.model)
    what = "stage-1 checkpoint (the output of `vltp train --stage 1`)" if config.stage == 2 else "VLTP checkpoint"
    try:
        vltp_config = read_vltp_config(model_dir)
    except ValueError as error:
        raise config.error("model", str(error).replace("a VLTP checkpoint", f"a {what}")) from None
    if not any(model_dir.glob("*.safetensors")):
        raise config.error("model", f"{model_dir} is not a {what}: no *.safetensors there")
    if Path(config.output_dir).resolve() == model_dir.resolve():
        raise config.error("output_dir", "must differ from 'model', which the run reads")
    _check_output_dir(config)
    if config.data.format not in ("rio", "coco_tasks"):
        raise config.error("data.format", f"expected 'rio' or 'coco_tasks', got {config.data.format!r}")
    for name in ("annotations", "images"):
        if not Path(getattr(config.data, name)).exists():
            raise config.error(f"data.{name}", f"no such file or folder: {getattr(config.data, name)}")
    if config.lora.r < 1 or config.lora.alpha <= 0 or not 0 <= config.lora.dropout < 1:
        raise config.error("lora", f"need r >= 1, alpha > 0 and dropout in [0, 1), got {config.lora}")
    if config.stage == 1:
        _check_lora_targets(config, vltp_config)
    bad_answers = [answer for answer in config.answers if answer.count("[SEG]") != 1]
    if not config.answers or bad_answers:
        raise config.error("answers", f"every answer needs exactly one [SEG], got {bad_answers or config.answers}")
    if config.empty_targets not in EMPTY_TARGET_CHOICES:
        raise config.error("empty_targets", f"expected one of {EMPTY_TARGET_CHOICES}, got {config.empty_targets!r}")
    bad_answers = [answer for answer in config.no_target_answers if "[SEG]" in answer or not answer.strip()]
    if not config.no_target_answers or bad_answers:
        raise config.error(
            "no_target_answers",
            f"need at least one non-empty answer, none holding [SEG], got {bad_answers or config.no_target_answers}",
        )
    if config.cache_batch_size < 1:
        raise config.error("cache_batch_size", f"must be at least 1, got {config.cache_batch_size}")
    num_stages = len(vltp_config.vision_config.prune_layers)
    if config.stage == 1:
        for name in ("prune_rates", "prune_temperature"):
            if getattr(config, name) is not None:
                raise config.error(name, "stage 1 trains the dense model; pruning is set in stage 2")
    else:
        if config.prune_rates is None:
            raise config.error("prune_rates", f"missing: stage 2 needs one rate per pruning stage ({num_stages})")
        try:
            check_prune_rates(config.prune_rates, num_stages)
        except ValueError as error:
            raise config.error("prune_rates", str(error)) from None
        if config.prune_temperature is not None:
            try:
                check_prune_temperature(config.prune_temperature)
            except ValueError as error:
                raise config.error("prune_temperature", str(error)) from None
        if config.seg_cache is None:
            raise config.error(
                "seg_cache", "missing: stage 2 needs the folder of the [SEG] cache (built there when absent)"
            )
    args = training_arguments(config)
    record = run_record(config)
    _check_resume(config, record)

    cached = config.stage == 2 and Path(config.seg_cache).exists()
    if cached:
        _check_seg_cache(config)
    _check_grouping(config, args)
    if cached:
        return None, None, record
    train_set = load_split(config.data, config.data.train_split, config.data.max_train_samples, config.source)
    eval_set = None
    if config.data.eval_split:
        eval_set = load_split(config.data, config.data.eval_split, config.data.max_eval_samples, config.source)
    _check_user_text(config, [train_set, eval_set])
    return train_set, eval_set, record


def _check_grouping(config: TrainConfig, args: TrainingArguments) -> None:
    """Stage 2's `group_by_image` needs one device per process (`torch.nn.DataParallel` would split a batch's images
    and its rows apart) and, in an existing `[SEG]` cache, the `image_id` of every training row (the loaders give
    one, so a cache built from them has it)."""
    if config.stage != 2 or not config.group_by_image:
        return
    if args.n_gpu > 1:
        raise config.error(
            "group_by_image",
            f"one process would drive {args.n_gpu} GPUs through torch.nn.DataParallel, which splits a batch's images "
            "and rows apart: launch one process per GPU (accelerate launch, torchrun) or set group_by_image: false",
        )
    if Path(config.seg_cache).exists():
        rows = load_from_disk(config.seg_cache)["train"]
        image_ids = rows["image_id"] if "image_id" in rows.column_names else [None] * len(rows)
        try:
            ImageBatchSampler(image_ids, args.per_device_train_batch_size)
        except ValueError as error:
            raise config.error(
                "group_by_image",
                f"{config.seg_cache}, split train: {error}; set group_by_image: false to train without grouping",
            ) from None


def _check_user_text(config: TrainConfig, splits: list[Dataset | None]):
    """Tasks and answers are user text: one holding a control token of the tokenizer (`<image>`, `</s>`, `<pad>`, a
    second `[SEG]`, ...) is refused here, naming its record, before anything is written; the processor would refuse it
    only when its batch comes."""
    processor = VLTPProcessor.from_pretrained(config.model)
    answer_fields = (("answers", config.answers, 1), ("no_target_answers", config.no_target_answers, 0))
    for name, answers, max_seg_tokens in answer_fields:
        for answer in answers:
            try:
                processor.check_text(answer, f"answer {answer!r}", max_seg_tokens=max_seg_tokens)
            except ValueError as error:
                raise config.error(name, str(error)) from None
    for split in filter(None, splits):
        rows = split.with_format(None)  # the task and record columns, without opening images
        for task, record in zip(rows["task"], rows["record"]):
            try:
                processor.check_text(task, f"{record}: task")
            except ValueError as error:
                raise config.error("data", str(error)) from None


def read_vltp_config(path) -> VLTPConfig:
    """The `VLTPConfig` of a local checkpoint folder; `ValueError` with a one-line reason when `path` does not exist,
    has no config.json, or holds another model type (read from config.json before the config is built, since another
    model's config can fail VLTP's own checks first)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a VLTP checkpoint: no config.json there")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{config_file} is not a JSON object of settings") from None
    if model_type != VLTPConfig.model_type:
        raise ValueError(f"{path} holds a {model_type!r} model, not a VLTP checkpoint")
    try:
        return VLTPConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {config_file}: {' '.join(str(error).split())}") from None


def _check_output_dir(config: TrainConfig) -> None:
    """`output_dir` must be a folder that is empty or absent, unless the run resumes there or overwrites it."""
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise config.error("output_dir", f"{output} is a file, not a folder")
    ancestor = next(folder for folder in (output, *output.parents) if folder.exists())
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise config.error("output_dir", f"cannot write to {ancestor}")
    contents = sorted(entry.name for entry in output.iterdir()) if output.is_dir() else []
    if contents and not config.overwrite_output_dir and _resume_dir(config) != output.resolve():
        shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
        raise config.error(
            "output_dir",
            f"{output} is not empty (it holds {shown}): give --resume to continue its run, --overwrite "
            "(overwrite_output_dir: true) to start a new run there, or another folder",
        )


def _resume_dir(config: TrainConfig) -> Path | None:
    """The folder of the run `resume_from_checkpoint` continues, resolved."""
    resume = config.resume_from_checkpoint
    if not resume:
        return None
    return Path(config.output_dir).resolve() if resume is True else Path(resume).resolve().parent


def _check_lora_targets(config: TrainConfig, vltp_config: VLTPConfig) -> None:
    """Every `lora.target_modules` entry must name linear layers of the language model (built on the meta device)."""
    from transformers import AutoModel

    with torch.device("meta"):
        language_model = AutoModel.from_config(vltp_config.llava_config.text_config)
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in language_model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    unknown = [name for name in config.lora.target_modules if name not in linear]
    if unknown or not config.lora.target_modules:
        raise config.error(
            "lora.target_modules",
            f"no linear layer {unknown[0] if unknown else '(empty list)'!r} in the language model "
            f"(its linear layers: {', '.join(sorted(linear))})",
        )


def _sha256_files(files) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as stream:
            _digest_stream(digest, stream)
    return digest.hexdigest()


def _digest_stream(digest, stream, length: int | None = None) -> None:
    """Feed `length` bytes of `stream` (the rest when `None`) into `digest`, 16 MiB at a time."""
    while length is None or length > 0:
        chunk = stream.read(1 << 24 if length is None else min(length, 1 << 24))
        if not chunk:
            break
        digest.update(chunk)
        if length is not None:
            length -= len(chunk)


def data_fingerprint(data: DataSettings) -> str:
    """sha256 of the annotation file(s) the loaders read (every `*.json` of an annotation folder)."""
    path = Path(data.annotations)
    return _sha256_files(sorted(path.glob("*.json")) if path.is_dir() else [path])


def weights_fingerprint(model_dir, prefixes: tuple[str, ...] = ("",)) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors of a safetensors checkpoint whose names start
    with one of `prefixes`, read from the files' headers and data without building the model."""
    entries = []
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb") as stream:
            size = struct.unpack("<Q", stream.read(8))[0]
            header = json.loads(stream.read(size))
        entries += [(name, file, 8 + size, spec) for name, spec in header.items() if name.startswith(prefixes)]
    digest = hashlib.sha256()
    for name, file, start, spec in sorted(entries, key=lambda entry: entry[0]):
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        digest.update(f"{name}:{spec['dtype']}:{spec['shape']}:".encode())
        with open(file, "rb") as stream:
            stream.seek(start + begin)
            _digest_stream(digest, stream, end - begin)
    return digest.hexdigest()


def run_record(config: TrainConfig) -> dict:
    """What a run is started with: its settings (flattened), the stage, and fingerprints of the model (config and
    weights) and of the annotation data. A run resumes only when these match (see [`RESUMABLE_SETTINGS`])."""
    settings = json.loads(json.dumps(dataclasses.asdict(config)))
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key in ("data", "lora", "training"):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    model = Path(config.model)
    return {
        "settings": {key: value for key, value in flat.items() if key not in RESUMABLE_SETTINGS},
        "model": str(model),
        "model_fingerprint": _sha256_files([model / "config.json"]) + weights_fingerprint(model),
        "data_fingerprint": data_fingerprint(config.data),
        "checkpoints": {},
    }


_FINGERPRINTS = {
    "model_fingerprint": "the model's config or weights differ",
    "llava_fingerprint": "the model's LLaVA side (weights, config, text_hidden_fcs) differs",
    "data_fingerprint": "the annotation files differ",
}


def record_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two run records (or two [`seg_cache_info`]s), one short phrase per difference; the
    model's path and the list of checkpoints are left out (the model's fingerprint is compared instead)."""
    differences = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if key in ("checkpoints", "model") or before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            differences += record_differences(before, after, "" if key == "settings" else f"{prefix}{key}.")
        else:
            differences.append(_FINGERPRINTS.get(key) or f"{prefix}{key} {before!r:.40} -> {after!r:.40}")
    return differences


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _checkpoint_step(path: Path) -> int:
    suffix = path.name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


def _check_resume(config: TrainConfig, record: dict) -> None:
    """Resolve `resume_from_checkpoint` to a complete checkpoint of the same run: `True` takes the last checkpoint
    the run record lists as complete, naming those skipped (a save interrupted by a crash, or not this run's)."""
    resume = config.resume_from_checkpoint
    if not resume:
        return
    run_dir = _resume_dir(config)
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise config.error("resume_from_checkpoint", f"no such checkpoint folder: {resume}")
    if resume is True and not any(run_dir.glob("checkpoint-*")):
        raise config.error("resume_from_checkpoint", f"no checkpoint-* folder in {run_dir} to resume from")
    stored = _read_record(run_dir / RUN_RECORD)
    if stored is None:
        raise config.error(
            "resume_from_checkpoint", f"{run_dir} has no readable {RUN_RECORD}: it is not a run of `vltp train`"
        )
    differences = record_differences(stored, record)
    if differences:
        raise config.error(
            "resume_from_checkpoint",
            f"{run_dir} holds a different run (started from {stored.get('model')}): {'; '.join(differences[:4])}"
            + (f" (and {len(differences) - 4} more)" if len(differences) > 4 else ""),
        )
    complete = stored.get("checkpoints", {})
    if isinstance(resume, str):
        if Path(resume).name not in complete:
            raise config.error("resume_from_checkpoint", f"{resume} is incomplete: its save did not finish")
        return
    folders = sorted((path for path in run_dir.glob("checkpoint-*") if path.is_dir()), key=_checkpoint_step)
    usable = [path for path in folders if path.name in complete]
    if not usable:
        raise config.error(
            "resume_from_checkpoint",
            f"no complete checkpoint in {run_dir} ({', '.join(p.name for p in folders)} incomplete)",
        )
    skipped = [path.name for path in folders if _checkpoint_step(path) > _checkpoint_step(usable[-1])]
    if skipped:
        logger.warning(
            f"resuming from {usable[-1].name}; skipped {', '.join(skipped)}: incomplete (a save that did not finish) "
            "or not written by this run"
        )
    config.resume_from_checkpoint = str(usable[-1])


def check_engine(args: TrainingArguments) -> None:
    """Refuse, in one line, a launch whose engine would not run, as accelerate falls back silently: FSDP asked
    (`ACCELERATE_USE_FSDP`) where accelerate's state cannot become FSDP (it does only from a multi-accelerator DDP
    state, never on CPUs), DeepSpeed asked (`ACCELERATE_USE_DEEPSPEED`) with `use_cpu` (which drops it), or several
    processes launched (`WORLD_SIZE`) that the Trainer would not join in one gradient exchange."""
    from accelerate.utils import DistributedType

    args.device  # sets up `args.distributed_state`, as the Trainer will
    kind, processes = args.distributed_state.distributed_type, args.world_size
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if kind is DistributedType.NO and launched > 1:
        running = f"{launched} processes each training its own copy (distributed_type NO: no gradient exchange)"
    else:
        engine = "DDP over gloo" if kind is DistributedType.MULTI_CPU else f"distributed_type {kind.value}"
        running = f"{engine} on {processes} process{'es' if processes > 1 else ''}"
    asked = []
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and (
        not kind.name.startswith("MULTI_") or kind is DistributedType.MULTI_CPU
    ):
        asked.append("FSDP")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and args.use_cpu:
        asked.append("DeepSpeed (use_cpu drops it)")
    if launched > 1 and (processes != launched or kind is DistributedType.NO):
        asked.append(f"{launched} processes exchanging gradients")
    if asked:
        raise TrainingInputError(
            f"the launch asked for {' and '.join(asked)}, but {running} would run (docs/training.md, Engines)"
        )


def _start_run(config: TrainConfig, args: TrainingArguments, record: dict) -> Path:
    """After every process has checked the config and the engine ([`check_engine`]), the main process writes the run
    record into `output_dir` (a resumed run keeps its own, with its list of complete checkpoints). Returns the
    record's path."""
    from accelerate import PartialState

    check_engine(args)
    state = PartialState()
    state.wait_for_everyone()
    path = Path(config.output_dir) / RUN_RECORD
    resumed_here = _resume_dir(config) == Path(config.output_dir).resolve()
    if state.is_main_process and not resumed_here:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
    state.wait_for_everyone()
    return path


def _run(trainer: VLTPTrainer, config: TrainConfig, rates, start: float, trained_name: str, export) -> TrainSummary:
    """Train (resuming if asked), evaluate, save what was trained under `output_dir/<trained_name>` and let the main
    process export the full checkpoint to `output_dir`."""
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint or None)
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    trained_dir = Path(config.output_dir) / trained_name
    trainer.save_model(str(trained_dir))
    trainer.accelerator.wait_for_everyone()
    summary = TrainSummary(
        stage=config.stage,
        output_dir=config.output_dir,
        num_processes=trainer.args.world_size,
        global_step=trainer.state.global_step,
        train_loss=result.training_loss if math.isfinite(result.training_loss) else None,
        eval_metrics=metrics,
        prune_rates=list(rates),
        seconds=time.monotonic() - start,
    )
    if trainer.is_world_process_zero():
        export(str(trained_dir))
        (Path(config.output_dir) / "train_summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2))
    trainer.accelerator.wait_for_everyone()
    return summary


def train(config: TrainConfig, callbacks=None) -> TrainSummary:
    """Run the config's stage."""
    return (train_stage1 if config.stage == 1 else train_stage2)(config, callbacks)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation at several rates
# --------------------------------------------------------------------------------------------------------------------


class _RandomTokenScores(torch.nn.Module):
    """In place of the prune decoder: uniformly random token scores, so that each stage keeps a random set."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator

    def forward(self, image_tokens: torch.Tensor, guidance_embeds: torch.Tensor) -> torch.Tensor:
        batch_size, grid = image_tokens.shape[0], image_tokens.shape[1]
        scores = torch.rand(batch_size, grid * grid, generator=self.generator)
        return scores.to(image_tokens.device, image_tokens.dtype)


@contextlib.contextmanager
def random_token_selection(model: VLTPSamModel, seed: int = 0):
    """Within the block, every pruning stage of `model`'s ViT keeps a uniformly random set of tokens (as many as the
    rate says) instead of the prune decoder's choice: the paper's "Random" baseline (Table 7). The random draws are
    seeded by `seed`; the prune decoder is put back on exit."""
    vision = model.vision_model
    prune_decoder = vision.prune_decoder
    vision.prune_decoder = _RandomTokenScores(torch.Generator().manual_seed(seed))
    try:
        yield
    finally:
        vision.prune_decoder = prune_decoder


# How `evaluate_rates` gets each sample's answer: LISA's validation answer forced (its protocol), or the model's own.
ANSWER_MODES = ("teacher-forced", "generated")


def distributed_process() -> tuple[int, int]:
    """(rank, number of processes) of the torch.distributed group (`accelerate launch`, `torchrun`), else (0, 1)."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(value) -> list:
    """`value` of every process, in rank order."""
    import torch.distributed as dist

    if distributed_process()[1] == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def evaluate_rates(
    model: VLTPForTaskSegmentation,
    processor: VLTPProcessor,
    dataset: Dataset,
    rates_list,
    batch_size: int = 8,
    answers: str = "teacher-forced",
    selection: str = "vltp",
    seed: int = 0,
) -> list[dict]:
    """Evaluation of `model` on `dataset` at each entry of `rates_list` (one rate per pruning stage). Returns per entry
    `prune_rates`, `gIoU`, `cIoU`, `mIoU_tasks`, `gmacs` (the ViT's, see [`vision_gmacs`]) and `answers`.

    Batches of at most `batch_size` rows hold whole images ([`image_batches`], by `image_id`), so that each image's
    tasks share its work. `answers="teacher-forced"` (LISA's protocol) forces LISA's validation answer
    "Sure, [SEG].": LLaVA runs once per batch, SAM once per rate with its dense layers once per image, and every
    sample gets a mask. `answers="generated"` lets the model answer ([`VLTPForTaskSegmentation.segment`], once per
    batch and rate, sharing each image's work): an answer without `[SEG]` predicts an empty mask, which an empty
    target credits. Then `nothing_on_empty` is also given: the share of empty targets answered without `[SEG]`
    (`None` when no target is empty). `score_spearman` is the rank correlation ([`spearman_correlation`]) of each
    predicted mask's score (SAM's predicted IoU) with its true IoU, over the samples that got a mask from `[SEG]`
    (`None` when undefined). `selection="random"` keeps random tokens instead of the prune decoder's (see
    [`random_token_selection`], seeded by `seed`), for the paper's random-pruning baseline.

    Under `accelerate launch` or `torchrun` (a torch.distributed group), process r evaluates every r-th batch; the
    per-sample pixel counts of all processes are gathered and every process returns the same metrics, equal to one
    process's (the batches are the same; random selection's draws excepted). A progress bar shows on process 0."""
    if answers not in ANSWER_MODES:
        raise ValueError(f"answers must be one of {ANSWER_MODES}, got {answers!r}")
    if selection not in ("vltp", "random"):
        raise ValueError(f'selection must be "vltp" or "random", got {selection!r}.')
    model.eval()
    columns = dataset.column_names
    # A row without an image id is an image of its own.
    ids = dataset["image_id"] if "image_id" in columns else [None] * len(dataset)
    image_ids = [("row", row) if image is None else image for row, image in enumerate(ids)]
    rank, world = distributed_process()
    batches = image_batches(image_ids, batch_size)[rank::world]
    rows = [row for batch in batches for row in batch]
    overlaps, nothing, scores = defaultdict(list), defaultdict(list), defaultdict(list)
    selecting = random_token_selection(model, seed) if selection == "random" else contextlib.nullcontext()
    with selecting:
        if answers == "teacher-forced":
            collator = VLTPDataCollator(processor, [DEFAULT_ANSWER], keep_targets=True)
            evaluated = seg_embeddings_by_batch(model, dataset, collator, batch_size, "evaluating", batches)
            for indices, (batch, seg, samples) in zip(batches, evaluated):
                # Each image's pixels once (its first row's), each guidance pointing at its image.
                first_rows, image_indices = group_rows_by_image([image_ids[row] for row in indices])
                pixels = batch["sam_pixel_values"][first_rows].to(model.device, model.dtype)
                image_of = torch.tensor(image_indices, device=model.device)
                for index, rates in enumerate(rates_list):
                    with torch.no_grad():
                        pred_masks, iou_scores, _ = model._decode_by_image(pixels, seg, image_of[samples], rates)
                    overlaps[index].append(mask_overlaps(processor, pred_masks, samples, batch))
                    scores[index].append(_first_seg_scores(iou_scores, samples, len(indices)))
        else:
            from tqdm.auto import tqdm

            for indices in tqdm(batches, desc="evaluating", disable=rank != 0):
                batch = dataset[indices]
                targets = [np.asarray(mask, dtype=bool) for mask in batch["mask"]]
                # A batch's rows of one image are consecutive, so `segment`'s results come back in row order.
                per_image = defaultdict(list)
                for row, image, task in zip(indices, batch["image"], batch["task"]):
                    per_image[image_ids[row]].append((image, task))
                images = [entries[0][0].convert("RGB") for entries in per_image.values()]
                tasks = [[task for _, task in entries] for entries in per_image.values()]
                for index, rates in enumerate(rates_list):
                    results = model.segment(images, tasks, processor, prune_rates=rates, max_batch_rows=batch_size)
                    overlaps[index].append(_overlaps([result.mask.numpy() for result in results], targets))
                    nothing[index] += [None if t.any() else not r.seg_found for r, t in zip(results, targets)]
                    found = [r.score if r.seg_found else float("nan") for r in results]
                    scores[index].append(torch.tensor(found, dtype=torch.float64))
    local = {
        "rows": rows,
        "counts": [
            torch.cat(overlaps[index]) if rows else torch.zeros(0, 2, dtype=torch.int64)
            for index in range(len(rates_list))
        ],
        "nothing": [nothing[index] for index in range(len(rates_list))],
        "scores": [
            torch.cat(scores[index]) if rows else torch.zeros(0, dtype=torch.float64)
            for index in range(len(rates_list))
        ],
    }
    shards = _gather(local)
    order = np.argsort(np.concatenate([shard["rows"] for shard in shards]), kind="stable")
    if len(order) != len(dataset):
        raise RuntimeError(f"evaluated {len(order)} of {len(dataset)} samples: the processes' shards do not add up")
    task_ids = np.asarray(dataset["task_id"] if "task_id" in columns else [-1] * len(dataset))
    results = []
    for index, rates in enumerate(rates_list):
        counts = torch.cat([shard["counts"][index] for shard in shards]).numpy()[order]
        metrics = tos_metrics_from_counts(counts[:, 0], counts[:, 1], task_ids)
        gmacs = vision_gmacs(model.config.vision_config, rates)
        results.append({"prune_rates": list(rates), **metrics, "gmacs": gmacs, "answers": answers})
        mask_scores = torch.cat([shard["scores"][index] for shard in shards]).numpy()[order]
        ious = np.array(sample_ious(counts[:, 0].tolist(), counts[:, 1].tolist()))
        found = np.isfinite(mask_scores)
        results[-1]["score_spearman"] = spearman_correlation(mask_scores[found], ious[found])
        if answers == "generated":
            empty = [flag for shard in shards for flag in shard["nothing"][index] if flag is not None]
            results[-1]["nothing_on_empty"] = sum(empty) / len(empty) if empty else None
    return results


__all__ = [
    "DataSettings",
    "LoraSettings",
    "TOSMetrics",
    "ANSWER_MODES",
    "EMPTY_TARGET_CHOICES",
    "TrainConfig",
    "TrainSummary",
    "TrainingInputError",
    "VLTPTrainer",
    "build_seg_cache",
    "check_config",
    "check_engine",
    "data_fingerprint",
    "distributed_process",
    "evaluate_rates",
    "image_batches",
    "ImageBatchSampler",
    "load_seg_cache",
    "load_split",
    "mask_overlaps",
    "merge_stage1",
    "outside_deepspeed",
    "prepare_stage1_model",
    "random_token_selection",
    "read_vltp_config",
    "record_differences",
    "run_record",
    "seg_cache_info",
    "seg_embeddings_by_batch",
    "train",
    "train_stage1",
    "train_stage2",
    "training_arguments",
    "weights_fingerprint",
    "with_targets",
    "write_back_segmenter",
]
