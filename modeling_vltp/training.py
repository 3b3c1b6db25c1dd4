"""Finetuning VLTP with the Hugging Face `Trainer`, in the paper's two stages.

Stage 1, vision-language finetuning (paper Sec. 5.2, LISA's recipe): LoRA through peft on the LLaVA language model's
`q_proj`/`v_proj`; the projection `text_hidden_fcs`, SAM's mask decoder and the embedding and output rows of the new
tokens (`[SEG]`, `<image>`) are trained; LLaVA's vision tower and projector and all of SAM's ViT (prune decoder
included) stay frozen. SAM's ViT runs densely. Loss: LM cross-entropy + mask BCE + Dice (weights 1 / 2 / 0.5 from the
model config). The adapter is merged at the end, so the output is a plain VLTP checkpoint.

Stage 2, VLTP@Finetune (Sec. 4.3 and 5.3, Eq. 12): the prune decoder and the mask decoder are trained at the given
pruning rates with LLaVA and the ViT frozen; loss L_X + L_P. As LLaVA is frozen, one pass first stores every sample's
projected `[SEG]` embedding in a `datasets` cache ([`build_seg_cache`]); stage 2 then trains [`VLTPSamSegmenter`] (the
SAM side only) from that cache without loading LLaVA, and writes its weights back into a full checkpoint. Starting
from a stage-2 checkpoint with other rates finetunes for the new rates (Table 4); the cache stays valid, since stage 2
never changes LLaVA or `text_hidden_fcs`.

Both stages evaluate with teacher forcing of LISA's validation answer: gIoU and cIoU at each image's own size (as
LISA and VLTP report them) and the GMACs of the ViT at the rates trained. Everything runs under `accelerate launch`
(DDP, DeepSpeed, FSDP). `vltp train --stage 1|2 --config FILE.yaml` drives it from the command line
(see `docs/training.md`).
"""

import dataclasses
import gc
import json
import math
import shutil
import time
import types
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from datasets import Dataset, DatasetDict, load_from_disk
from safetensors.torch import load_file, save_file
from transformers import EvalPrediction, Trainer, TrainingArguments, set_seed

from .configuration_vltp import VLTPConfig, VLTPVisionConfig, check_prune_rates
from .data import load_coco_tasks, load_rio
from .data.masks import decode_mask_batch
from .data.synthetic import TASK_NAMES as SYNTHETIC_TASK_NAMES
from .flops import count_gmacs
from .metrics import tos_metrics_from_counts
from .modeling_vltp import VLTPForTaskSegmentation, VLTPSamSegmenter, VLTPSamVisionModel
from .processing_vltp import DEFAULT_ANSWER, VLTPProcessor

# LISA's answers (`ANSWER_LIST` of LISA's utils); training draws one per sample.
LISA_ANSWERS = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)

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

SEG_CACHE_COLUMN = "seg_embed"
_SEG_CACHE_INFO = "vltp_seg_cache.json"

STAGE1_LOSSES = ("lm_loss", "mask_bce_loss", "mask_dice_loss")
STAGE2_LOSSES = ("mask_bce_loss", "mask_dice_loss", "prune_loss")
STAGE1_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "sam_pixel_values",
    "labels",
    "masks",
    "reshaped_input_sizes",
)
STAGE2_INPUTS = ("sam_pixel_values", "seg_embeds", "masks", "reshaped_input_sizes")


class TrainingInputError(ValueError):
    """Bad input found before training starts. The message is one line naming the file and the field."""


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DataSettings:
    """Where the samples come from: a RIO or COCO-Tasks layout (real or synthetic, see `docs/data.md`).

    `annotations` is RIO's split file or folder, or COCO-Tasks' annotation folder; `images` the COCO 2014 root.
    `tasks` picks COCO-Tasks task numbers; `task_names` is a list of names or `"synthetic"` for the synthetic world's.
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
    stage-2) output in stage 2. `prune_rates` (stage 2) gives one rate per pruning stage; `seg_cache` (stage 2) is the
    folder of the `[SEG]` cache, built there from `model` when absent. `training` holds `TrainingArguments` fields.
    """

    stage: int
    model: str
    output_dir: str
    data: DataSettings
    training: dict = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    answers: list[str] = field(default_factory=lambda: list(LISA_ANSWERS))
    prune_rates: list[float] | None = None
    seg_cache: str | None = None
    train_mask_decoder: bool = True
    cache_batch_size: int = 8
    resume_from_checkpoint: bool | str | None = None
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
    known = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    for name, value in settings.items():
        if name not in known:
            raise config.error(f"training.{name}", "not a field of transformers.TrainingArguments")
        if name == "output_dir":
            raise config.error("training.output_dir", "give the output directory as the top-level 'output_dir'")
        if isinstance(value, str) and known[name].type in (float, "float"):
            try:
                settings[name] = float(value)
            except ValueError:
                raise config.error(f"training.{name}", f"expected a number, got {value!r}") from None
    try:
        return TrainingArguments(output_dir=config.output_dir, **settings)
    except (ValueError, TypeError) as error:
        raise config.error("training", " ".join(str(error).split())) from None


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
            names = SYNTHETIC_TASK_NAMES if data.task_names == "synthetic" else data.task_names
            extra = {"task_names": tuple(names)} if names is not None else {}
            dataset = load_coco_tasks(data.annotations, data.images, split, tasks=data.tasks, **extra)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingInputError(f"{source}: data ({data.format}, split {split!r}): {error}") from None
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise TrainingInputError(f"{source}: data ({data.format}, split {split!r}): no samples")
    encoded = dataset.with_format(None)["mask"]
    if not any(json.loads(mask)["segmentations"] for mask in encoded):
        raise TrainingInputError(
            f"{source}: data ({data.format}, split {split!r}): no target masks, every sample's mask is empty"
        )
    return dataset


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


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def mask_overlaps(processor: VLTPProcessor, pred_masks, seg_sample_indices, batch: dict) -> torch.Tensor:
    """(B, 2) intersection and union, in pixels at each image's own size, of each sample's predicted mask (its first
    `[SEG]`'s; empty without one) and its target `batch["target_masks"]`."""
    masks = {}
    if len(seg_sample_indices):
        samples = seg_sample_indices.cpu()
        resized = processor.post_process_masks(
            pred_masks.detach().float().cpu(),
            batch["original_sizes"].cpu()[samples],
            batch["reshaped_input_sizes"].cpu()[samples],
        )
        for sample, mask in zip(samples.tolist(), resized):
            masks.setdefault(sample, mask.numpy())
    counts = []
    for sample, target in enumerate(batch["target_masks"]):
        predicted = masks.get(sample, np.zeros_like(target))
        counts.append(((predicted & target).sum(), (predicted | target).sum()))
    return torch.tensor(counts, dtype=torch.int64)


def vision_gmacs(vision_config: VLTPVisionConfig, prune_rates) -> float:
    """GMACs of one image through SAM's ViT at `prune_rates`, prune decoder included, counted on the meta device.
    All rates 0 counts SAM's plain ViT (no prune decoder), the paper's baseline rows."""
    rates = [float(rate) for rate in prune_rates]
    with torch.device("meta"):
        model = VLTPSamVisionModel(vision_config)
        pixel_values = torch.empty(1, vision_config.num_channels, vision_config.image_size, vision_config.image_size)
        guidance = torch.empty(1, vision_config.guidance_dim) if any(rates) else None
    return count_gmacs(model, pixel_values, guidance_embeds=guidance, prune_rates=rates)


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
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class VLTPTrainer(Trainer):
    """`Trainer` for both stages.

    The loss is the weighted sum (weights from the model config) of the parts named in `losses`: stage 1 leaves out
    the pruning loss, since its ViT runs densely and its prune decoder is frozen. The model receives only the batch
    entries named in `input_names`, with `prune_rates`. Evaluation returns, per sample, the pixel intersection and
    union of its mask (see [`mask_overlaps`]) as predictions and its task id as label, for [`TOSMetrics`]; its
    batches come from `eval_data_collator` (teacher-forced validation answer, targets kept) when given.
    """

    def __init__(self, *args, losses, input_names, prune_rates, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self.losses = tuple(losses)
        self.input_names = tuple(input_names)
        self.prune_rates = list(prune_rates)
        # The losses are per-batch means: let the Trainer average them over gradient-accumulation steps.
        self.model_accepts_loss_kwargs = False

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
        config = self._config()
        parts = {name: getattr(outputs, name) for name in self.losses}
        return sum(getattr(config, f"{name}_weight") * part for name, part in parts.items() if part is not None)

    def _forward(self, model, inputs):
        model_inputs = {name: inputs[name] for name in self.input_names if name in inputs}
        return model(**model_inputs, prune_rates=self.prune_rates)

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


def merge_stage1(base_model: str, adapter_dir: str, output_dir: str) -> VLTPForTaskSegmentation:
    """Load `base_model`, apply the stage-1 adapter of `adapter_dir`, merge it and save the plain VLTP checkpoint and
    the processor to `output_dir` (as LISA's merge script does)."""
    from peft import PeftModel

    model = VLTPForTaskSegmentation.from_pretrained(base_model)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    VLTPProcessor.from_pretrained(base_model).save_pretrained(output_dir)
    return merged


def train_stage1(config: TrainConfig, callbacks=None) -> TrainSummary:
    """Stage 1 from a checked `TrainConfig` (see [`check_config`]); writes the merged model to `config.output_dir`."""
    start = time.monotonic()
    train_set, eval_set = check_config(config)
    args = training_arguments(config)
    set_seed(args.seed)
    processor = VLTPProcessor.from_pretrained(config.model)
    model = prepare_stage1_model(VLTPForTaskSegmentation.from_pretrained(config.model), processor, config.lora)
    dense = [0.0] * len(model.config.vision_config.prune_layers)
    trainer = VLTPTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=VLTPDataCollator(processor, config.answers, seed=args.seed),
        eval_data_collator=VLTPDataCollator(processor, [DEFAULT_ANSWER], keep_targets=True),
        processing_class=processor,
        compute_metrics=TOSMetrics(model.config.vision_config, dense),
        callbacks=callbacks,
        losses=STAGE1_LOSSES,
        input_names=STAGE1_INPUTS,
        prune_rates=dense,
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


@torch.no_grad()
def seg_embeddings(model: VLTPForTaskSegmentation, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected `[SEG]` states of a teacher-forced batch, (S, guidance_dim), and the sample of each."""
    device = model.device
    _, seg_embeds, samples = model.seg_embeddings(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["pixel_values"].to(device, model.dtype),
    )
    return seg_embeds, samples


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

    The cache is written to a temporary folder and moved into place when complete, so an interrupted pass leaves no
    cache that looks valid.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    path = Path(path)
    model.eval()
    collator = VLTPDataCollator(processor, [DEFAULT_ANSWER])
    cache = {}
    for name, dataset in splits.items():
        embeds = []
        for batch in tqdm(
            DataLoader(dataset, batch_size=batch_size, collate_fn=collator), desc=f"[SEG] cache, {name}"
        ):
            seg, samples = seg_embeddings(model, batch)
            if samples.tolist() != list(range(len(batch["input_ids"]))):
                raise RuntimeError("expected exactly one [SEG] per teacher-forced sample")
            embeds.append(seg.float().cpu())
        cache[name] = dataset.with_format(None).add_column(SEG_CACHE_COLUMN, torch.cat(embeds).tolist())
    cache = DatasetDict(cache)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cache.save_to_disk(partial)
    (partial / _SEG_CACHE_INFO).write_text(
        json.dumps({"guidance_dim": model.config.vision_config.guidance_dim, **(info or {})}, indent=2)
    )
    partial.rename(path)
    return load_seg_cache(path)


def load_seg_cache(path) -> DatasetDict:
    """A cache written by [`build_seg_cache`], its masks decoded when rows are read."""
    cache = load_from_disk(str(path))
    for split in cache.values():
        split.set_transform(decode_mask_batch)
    return cache


def _check_seg_cache(config: TrainConfig, vltp_config: VLTPConfig):
    path = Path(config.seg_cache)
    info_file = path / _SEG_CACHE_INFO
    if not info_file.is_file():
        raise config.error(
            "seg_cache",
            f"{path} exists but is not a [SEG] cache (no {_SEG_CACHE_INFO}); delete it or name another folder",
        )
    info = json.loads(info_file.read_text())
    if info.get("guidance_dim") != vltp_config.vision_config.guidance_dim:
        raise config.error(
            "seg_cache",
            f"{path} holds {info.get('guidance_dim')}-d embeddings but the model's guidance_dim is "
            f"{vltp_config.vision_config.guidance_dim}",
        )
    wanted = ["train"] + (["eval"] if config.data.eval_split else [])
    missing = [split for split in wanted if split not in info.get("splits", {})]
    if missing:
        raise config.error("seg_cache", f"{path} has no '{missing[0]}' split; delete it to rebuild it")


def write_back_segmenter(
    segmenter: VLTPSamSegmenter, base_model: str, output_dir: str, prune_rates, processor: VLTPProcessor
) -> None:
    """Save the full checkpoint of `base_model` with the segmenter's weights in place of its own and
    `vision_config.prune_rates` set to `prune_rates`, shard by shard, without building LLaVA."""
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
    config.save_pretrained(output)
    processor.save_pretrained(output)


def train_stage2(config: TrainConfig, callbacks=None) -> TrainSummary:
    """Stage 2 from a checked `TrainConfig`: builds the `[SEG]` cache when absent (the only time LLaVA is loaded),
    trains [`VLTPSamSegmenter`] at `config.prune_rates` and writes the full checkpoint to `config.output_dir`."""
    start = time.monotonic()
    splits = check_config(config)
    args = training_arguments(config)
    processor = VLTPProcessor.from_pretrained(config.model)
    with args.main_process_first(desc="[SEG] cache"):
        if not Path(config.seg_cache).exists():
            model = VLTPForTaskSegmentation.from_pretrained(config.model).to(args.device)
            datasets = {name: split for name, split in zip(("train", "eval"), splits) if split is not None}
            sources = {"train": config.data.train_split, "eval": config.data.eval_split}
            info = {"model": config.model, "splits": {name: sources[name] for name in datasets}}
            build_seg_cache(model, processor, datasets, config.seg_cache, config.cache_batch_size, info)
            del model
            gc.collect()
        cache = load_seg_cache(config.seg_cache)
    set_seed(args.seed)
    segmenter = VLTPSamSegmenter.from_pretrained(config.model)
    segmenter.requires_grad_(False)
    segmenter.vision_model.prune_decoder.requires_grad_(True)
    segmenter.mask_decoder.requires_grad_(config.train_mask_decoder)
    rates = list(config.prune_rates)
    trainer = VLTPTrainer(
        model=segmenter,
        args=args,
        train_dataset=cache["train"],
        eval_dataset=cache.get("eval"),
        data_collator=VLTPDataCollator(processor),
        eval_data_collator=VLTPDataCollator(processor, keep_targets=True),
        processing_class=processor,
        compute_metrics=TOSMetrics(segmenter.config.vision_config, rates),
        callbacks=callbacks,
        losses=STAGE2_LOSSES,
        input_names=STAGE2_INPUTS,
        prune_rates=rates,
    )

    def export(trained_dir):
        trained = VLTPSamSegmenter.from_pretrained(trained_dir)
        write_back_segmenter(trained, config.model, config.output_dir, rates, processor)

    return _run(trainer, config, rates, start, "segmenter", export)


# --------------------------------------------------------------------------------------------------------------------
# Both stages
# --------------------------------------------------------------------------------------------------------------------


def check_config(config: TrainConfig) -> tuple[Dataset | None, Dataset | None]:
    """Check everything a run needs before anything is written, raising [`TrainingInputError`]: the model checkpoint,
    the settings, the data (loaded and validated) and, in stage 2, the `[SEG]` cache. Returns the training and
    evaluation splits (both `None` in stage 2 when the cache exists, since the data is then not read)."""
    model_dir = Path(config.model)
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        what = "stage-1 checkpoint (the output of `vltp train --stage 1`)" if config.stage == 2 else "VLTP checkpoint"
        raise config.error("model", f"{model_dir} is not a {what}: no config.json and *.safetensors there")
    try:
        vltp_config = VLTPConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise config.error("model", f"cannot read {model_dir / 'config.json'}: {error}") from None
    if getattr(vltp_config, "model_type", None) != VLTPConfig.model_type:
        raise config.error("model", f"{model_dir} holds a {vltp_config.model_type!r} model, not a VLTP checkpoint")
    if Path(config.output_dir).resolve() == model_dir.resolve():
        raise config.error("output_dir", "must differ from 'model', which the run reads")
    if config.data.format not in ("rio", "coco_tasks"):
        raise config.error("data.format", f"expected 'rio' or 'coco_tasks', got {config.data.format!r}")
    for name in ("annotations", "images"):
        if not Path(getattr(config.data, name)).exists():
            raise config.error(f"data.{name}", f"no such file or folder: {getattr(config.data, name)}")
    if config.lora.r < 1 or config.lora.alpha <= 0 or not 0 <= config.lora.dropout < 1:
        raise config.error("lora", f"need r >= 1, alpha > 0 and dropout in [0, 1), got {config.lora}")
    bad_answers = [answer for answer in config.answers if answer.count("[SEG]") != 1]
    if not config.answers or bad_answers:
        raise config.error("answers", f"every answer needs exactly one [SEG], got {bad_answers or config.answers}")
    if config.cache_batch_size < 1:
        raise config.error("cache_batch_size", f"must be at least 1, got {config.cache_batch_size}")
    num_stages = len(vltp_config.vision_config.prune_layers)
    if config.stage == 1:
        if config.prune_rates is not None:
            raise config.error("prune_rates", "stage 1 trains the dense model; pruning rates are set in stage 2")
    else:
        if config.prune_rates is None:
            raise config.error("prune_rates", f"missing: stage 2 needs one rate per pruning stage ({num_stages})")
        try:
            check_prune_rates(config.prune_rates, num_stages)
        except ValueError as error:
            raise config.error("prune_rates", str(error)) from None
        if config.seg_cache is None:
            raise config.error(
                "seg_cache", "missing: stage 2 needs the folder of the [SEG] cache (built there when absent)"
            )
    _check_resume(config)
    training_arguments(config)

    if config.stage == 2 and Path(config.seg_cache).exists():
        _check_seg_cache(config, vltp_config)
        return None, None
    train_set = load_split(config.data, config.data.train_split, config.data.max_train_samples, config.source)
    eval_set = None
    if config.data.eval_split:
        eval_set = load_split(config.data, config.data.eval_split, config.data.max_eval_samples, config.source)
    return train_set, eval_set


def _check_resume(config: TrainConfig):
    resume = config.resume_from_checkpoint
    if resume is True:
        output = Path(config.output_dir)
        if not any(output.glob("checkpoint-*")):
            raise config.error("resume_from_checkpoint", f"no checkpoint-* folder in {output} to resume from")
    elif isinstance(resume, str) and not Path(resume).is_dir():
        raise config.error("resume_from_checkpoint", f"no such checkpoint folder: {resume}")


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


def evaluate_rates(
    model: VLTPForTaskSegmentation, processor: VLTPProcessor, dataset: Dataset, rates_list, batch_size: int = 8
) -> list[dict]:
    """Teacher-forced evaluation of `model` on `dataset` at each entry of `rates_list` (one rate per pruning stage):
    LLaVA runs once per batch, SAM once per rate. Returns per entry `prune_rates`, `gIoU`, `cIoU`, `mIoU_tasks` and
    `gmacs` (the ViT's, see [`vision_gmacs`])."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model.eval()
    collator = VLTPDataCollator(processor, [DEFAULT_ANSWER], keep_targets=True)
    overlaps, task_ids = defaultdict(list), []
    with torch.no_grad():
        for batch in tqdm(DataLoader(dataset, batch_size=batch_size, collate_fn=collator), desc="evaluating"):
            seg, samples = seg_embeddings(model, batch)
            pixels = batch["sam_pixel_values"].to(model.device, model.dtype)[samples.to(model.device)]
            for index, rates in enumerate(rates_list):
                pred_masks, _, _ = model.decode_masks(pixels, seg, rates)
                overlaps[index].append(mask_overlaps(processor, pred_masks, samples, batch))
            task_ids.append(batch["task_ids"])
    task_ids = torch.cat(task_ids).numpy()
    results = []
    for index, rates in enumerate(rates_list):
        counts = torch.cat(overlaps[index]).numpy()
        scores = tos_metrics_from_counts(counts[:, 0], counts[:, 1], task_ids)
        results.append(
            {"prune_rates": list(rates), **scores, "gmacs": vision_gmacs(model.config.vision_config, rates)}
        )
    return results


__all__ = [
    "DataSettings",
    "LISA_ANSWERS",
    "LoraSettings",
    "TOSMetrics",
    "TrainConfig",
    "TrainSummary",
    "TrainingInputError",
    "VLTPDataCollator",
    "VLTPTrainer",
    "build_seg_cache",
    "check_config",
    "evaluate_rates",
    "load_seg_cache",
    "load_split",
    "mask_overlaps",
    "merge_stage1",
    "prepare_stage1_model",
    "seg_embeddings",
    "train",
    "train_stage1",
    "train_stage2",
    "training_arguments",
    "vision_gmacs",
    "write_back_segmenter",
]
