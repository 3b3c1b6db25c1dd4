"""Tiny VLTP components built entirely offline (no Hub), small enough for tests, examples and CI on a CPU.

Everything here is deterministic: the same call returns the same vocabulary and the same preprocessing.
"""

import math

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import CLIPImageProcessorPil, LlavaConfig, PreTrainedTokenizerFast, SamImageProcessorPil

from .configuration_vltp import VLTPConfig, VLTPVisionConfig
from .data import synthetic
from .data.coco_tasks import COCO_TASKS_NAMES
from .data.collator import LISA_ANSWERS
from .data.masks import has_target
from .modeling_vltp import VLTPForTaskSegmentation
from .processing_vltp import (
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_QUESTION_TEMPLATE,
    VLTPProcessor,
    add_vltp_special_tokens,
)
from .testing_hub import HubServer, User, run_without_package  # noqa: F401 (re-exported)

TINY_VOCAB_SIZE = 500

# The tiny tokenizer learns its merges from LLaVA-1.5 chat prompts with LISA's question and answers around
# task-oriented queries (the 14 tasks of COCO-Tasks as VLTP phrases them, two in the style of RIO), plus LISA's other
# question forms. Any other text still tokenises, byte by byte.
_TASKS = [*COCO_TASKS_NAMES, "cut the food on the table", "hold the hot soup"]
_CORPUS = [
    DEFAULT_PROMPT_TEMPLATE.format(question=DEFAULT_QUESTION_TEMPLATE.format(task=f"you can use the thing to {task}"))
    + f" {answer}</s>"
    for task in _TASKS
    for answer in LISA_ANSWERS
] + [
    "Can you segment the cat in this image?",
    "Please segment the person in this image.",
    "What is the object in this image? Please respond with segmentation mask.",
    "Please output segmentation mask and explain why.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """
    A byte-level BPE tokenizer of `TINY_VOCAB_SIZE` tokens (plus `<image>` and `[SEG]`) trained on a built-in corpus.

    Like LLaMA's, it starts every text with `<s>`; its special tokens are `<s>`, `</s>`, `<pad>`, `<unk>` and
    `<image>`, and `[SEG]` is an added token (see `add_vltp_special_tokens`). Padding is on the right.
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right",
    )
    add_vltp_special_tokens(tokenizer)
    return tokenizer


def tiny_processor(sam_image_size: int = 128, clip_image_size: int = 32, clip_patch_size: int = 8) -> VLTPProcessor:
    """
    A [`VLTPProcessor`] with [`tiny_tokenizer`], a CLIP image processor at `clip_image_size` (shortest side resized,
    center crop, CLIP mean/std) and a SAM image processor at `sam_image_size` (longest side resized, padded square).

    The prompt gets `(clip_image_size // clip_patch_size) ** 2` image tokens (16 by default), the patch features of a
    CLIP vision tower of that image and patch size.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": clip_image_size}, crop_size={"height": clip_image_size, "width": clip_image_size}
    )
    sam_image_processor = SamImageProcessorPil(
        size={"longest_edge": sam_image_size}, pad_size={"height": sam_image_size, "width": sam_image_size}
    )
    return VLTPProcessor(
        image_processor,
        sam_image_processor,
        tiny_tokenizer(),
        num_image_tokens=(clip_image_size // clip_patch_size) ** 2,
    )


def tiny_llava_config(
    vocab_size: int, image_token_id: int, clip_image_size: int = 32, clip_patch_size: int = 8, **text_config
) -> LlavaConfig:
    """A random-weight-sized [`LlavaConfig`]: a 2-layer 32-wide CLIP at `clip_image_size` px with `clip_patch_size` px
    patches (16 image tokens by default) and a 2-layer 64-wide Llama; `text_config` adds fields of the Llama config
    (e.g. special token ids)."""
    return LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": clip_image_size,
            "patch_size": clip_patch_size,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 256,
            **text_config,
        },
        image_token_index=image_token_id,
        image_seq_length=(clip_image_size // clip_patch_size) ** 2,
    )


def _sam_decoder_configs(width: int, vision_config: VLTPVisionConfig) -> dict:
    """SAM's prompt encoder and a 2-layer mask decoder of width `width` for the ViT of `vision_config`."""
    return {
        "prompt_encoder_config": {
            "hidden_size": width,
            "image_size": vision_config.image_size,
            "patch_size": vision_config.patch_size,
            "mask_input_channels": 8,
        },
        "mask_decoder_config": {
            "hidden_size": width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": 2 * width,
            "iou_head_hidden_dim": width,
        },
    }


def tiny_config(processor: VLTPProcessor | None = None) -> VLTPConfig:
    """A [`VLTPConfig`] of a few hundred thousand parameters matching `processor` (default [`tiny_processor`]): a
    2-layer CLIP at the processor's CLIP size (32 px by default) and a 2-layer Llama for LLaVA, and a 4-layer SAM ViT
    at the processor's SAM size (128 px by default: 8x8 tokens in 3x3 windows, so the window grid is padded as SAM's
    is) pruned after layer 2 at rate 0.5."""
    processor = processor or tiny_processor()
    width = 32
    tokenizer = processor.tokenizer
    clip_image_size = processor.image_processor.crop_size["height"]
    llava_config = tiny_llava_config(
        len(tokenizer),
        processor.image_token_id,
        clip_image_size,
        clip_image_size // math.isqrt(processor.num_image_tokens),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = VLTPVisionConfig(
        hidden_size=width,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_dim=2 * width,
        image_size=processor.sam_image_processor.pad_size["height"],
        patch_size=16,
        window_size=3,
        global_attn_indexes=[1, 3],
        output_channels=width,
        num_pos_feats=width // 2,
        prune_layers=[2],
        prune_rates=[0.5],
        guidance_dim=width,
        prune_decoder_hidden_size=width,
        prune_decoder_num_attention_heads=2,
        prune_decoder_mlp_dim=2 * width,
    )
    return VLTPConfig(
        llava_config=llava_config,
        vision_config=vision_config,
        **_sam_decoder_configs(width, vision_config),
        seg_token_id=processor.seg_token_id,
    )


def tiny_model_and_processor(seed: int = 0) -> tuple[VLTPForTaskSegmentation, VLTPProcessor]:
    """A small random [`VLTPForTaskSegmentation`] (in eval mode) and the [`VLTPProcessor`] it fits, built offline.

    SAM's ViT weight matrices, positional and relative-position tables are drawn with std 0.02 (SAM's own initializer
    range of 1e-10 would make every image token alike), so pruning has distinct tokens to choose from; biases and
    LayerNorms keep their usual initialisation.
    """
    processor = tiny_processor()
    torch.manual_seed(seed)
    model = VLTPForTaskSegmentation(tiny_config(processor))
    with torch.no_grad():
        for parameter in model.vision_model.vision_encoder.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02)
    return model.eval(), processor


def small_processor() -> VLTPProcessor:
    """The [`tiny_processor`] of [`small_config`]: SAM at 128 px and CLIP at 64 px with 8-pixel patches (64 image
    tokens). At 32 px the world's small objects are a few CLIP pixels wide, and the tiny LLaVA trained from scratch
    answered "nothing fits" for 16-20% of the colour tasks that had a target (3 seeds); at 64 px, for 0-5%
    (docs/training.md)."""
    return tiny_processor(clip_image_size=64)


def small_config(processor: VLTPProcessor | None = None, **vision_overrides) -> VLTPConfig:
    """A [`VLTPConfig`] for learning experiments on the CPU (`benchmarks/learn_synthetic.py`), where pruning matters.

    [`tiny_config`]'s LLaVA for `processor` (default [`small_processor`]), with a SAM side that can learn the synthetic
    world: 8-pixel patches at 128 px (16x16 tokens in 4x4 windows, global attention in layers 2 and 4), pruned after
    layer 1 at rate 0.5, so that three of the four layers run on the kept tokens only, and a 64-wide neck, prompt
    encoder and mask decoder. (With a 32-wide mask decoder, SAM's upscaling leaves 32 / 8 = 4 channels per mask pixel,
    too few to tell the world's traits apart.)
    `vision_overrides` replace fields of the ViT's config (e.g. a wider ViT in `benchmarks/shape_probe.py`).
    """
    tiny = tiny_config(processor or small_processor())
    width = tiny.vision_config.hidden_size
    mask_width = 2 * width
    vision_config = VLTPVisionConfig(
        **{
            **tiny.vision_config.to_dict(),
            "patch_size": 8,
            "window_size": 4,
            "global_attn_indexes": [1, 3],
            "prune_layers": [1],
            "prune_rates": [0.5],
            "output_channels": mask_width,
            "num_pos_feats": mask_width // 2,
            "guidance_dim": mask_width,
            **vision_overrides,
        }
    )
    return VLTPConfig(
        llava_config=tiny.llava_config,
        vision_config=vision_config,
        **_sam_decoder_configs(mask_width, vision_config),
        seg_token_id=tiny.seg_token_id,
    )


def small_model_and_processor(seed: int = 0, **vision_overrides) -> tuple[VLTPForTaskSegmentation, VLTPProcessor]:
    """A random [`VLTPForTaskSegmentation`] of [`small_config`] (with `vision_overrides`; in eval mode) and its
    [`small_processor`], offline.

    Every Linear and convolution of the SAM side (ViT, neck, mask decoder) and of the `[SEG]` projection
    `text_hidden_fcs` gets PyTorch's default initialisation, scaled to its fan-in: the std of 0.02 that large models
    use shrinks the output of each of these 32- and 64-wide layers about tenfold, so the mask decoder's chains of such
    layers learn very slowly and almost no gradient of the mask losses reaches the language model.
    """
    processor = small_processor()
    torch.manual_seed(seed)
    model = VLTPForTaskSegmentation(small_config(processor, **vision_overrides))
    for part in (model.vision_model.vision_encoder, model.mask_decoder, model.text_hidden_fcs):
        for module in part.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                module.reset_parameters()
    with torch.no_grad():
        encoder = model.vision_model.vision_encoder
        encoder.pos_embed.normal_(0.0, 0.02)
        for layer in encoder.layers:
            layer.attn.rel_pos_h.normal_(0.0, 0.02)
            layer.attn.rel_pos_w.normal_(0.0, 0.02)
    return model.eval(), processor


def tasks_present(dataset) -> dict[int, torch.Tensor]:
    """image id -> (12,) float tensor over the synthetic world's tasks, 1 where the image has an object answering the
    task (its target is not empty): the targets of [`PretrainingProbes`]' image probe. `dataset`: a loaded RIO split
    of a world generated with all 12 tasks per image; its masks are not decoded."""
    present = {}
    for row in dataset.with_format(None).select_columns(["image_id", "task", "mask"]):
        vector = present.setdefault(row["image_id"], torch.zeros(len(synthetic.TASKS)))
        vector[synthetic.TASK_OF_SENTENCE[row["task"].strip()]] = float(has_target(row["mask"]))
    return present


class PretrainingProbes(nn.Module):
    """Two linear probes that stand in for what a pretrained LLaVA knows, when the small system of [`small_config`]
    is trained from scratch (`benchmarks/learn_synthetic.py`, `tests/test_learning.py`; see docs/training.md, "Proof
    that it learns"). Trained next to the model's own losses and then dropped:

    - `task`, on the `[SEG]` embeddings: which of `num_tasks` tasks the row asks for (cross-entropy), weighted by
      `task_weight`. Without it the tiny LLaMA does not put the task into its `[SEG]` state, so SAM gets no usable
      guidance: SAM's mask decoder never starts reading `[SEG]` states that barely differ, and so sends back no
      gradient that would set them apart (`benchmarks/seg_guidance.py`);
    - `image`, on the language model's last hidden states averaged over the image tokens: which of the tasks the
      image answers, i.e. has an object for (binary cross-entropy per task). Without it the tiny LLaVA answers
      "nothing fits" from the task's words alone: after 1500 steps its share of such answers was the same on empty and
      non-empty targets, task by task.
    """

    def __init__(self, config: VLTPConfig, num_tasks: int, task_weight: float = 1.0):
        super().__init__()
        self.image_token_id = config.llava_config.image_token_id
        self.task_weight = task_weight
        self.task = nn.Linear(config.vision_config.guidance_dim, num_tasks)
        self.image = nn.Linear(config.llava_config.text_config.hidden_size, num_tasks)

    def forward(self, outputs, input_ids, task_index, tasks_present) -> torch.Tensor:
        """The image probe's loss plus `task_weight` times the task probe's (left out at weight 0). `outputs`: the
        model's output for `input_ids`, run with `output_hidden_states=True`; `task_index` (B,): each row's task;
        `tasks_present` (B, num_tasks): 1 for each task that the row's image answers."""
        task = 0.0
        if self.task_weight:
            task_logits = self.task(outputs.seg_embeds)
            task = self.task_weight * nn.functional.cross_entropy(task_logits, task_index[outputs.seg_sample_indices])
        image_tokens = (input_ids == self.image_token_id).unsqueeze(-1).float()
        pooled = (outputs.hidden_states[-1] * image_tokens).sum(1) / image_tokens.sum(1)
        image = nn.functional.binary_cross_entropy_with_logits(self.image(pooled), tasks_present)
        return task + image


def task_maps(masks, image_of_row, task_index, num_tasks: int, grid: int, chunk: int = 1000) -> torch.Tensor:
    """The targets of [`TaskMapProbe`]: (num_images, num_tasks, grid, grid), the share of each ViT token's patch that
    each task's target covers, for every image. `masks` (R, S, S): each row's target in SAM's padded frame (as the
    processor gives them); `image_of_row`, `task_index` (R,): each row's image (0, 1, ...) and task. A task without a
    row for an image counts as covering none of it. Rows are pooled `chunk` at a time, so that boolean masks of a
    whole training split need no float copy."""
    maps = torch.zeros(int(image_of_row.max()) + 1, num_tasks, grid, grid)
    for start in range(0, len(masks), chunk):
        rows = slice(start, start + chunk)
        pooled = nn.functional.adaptive_avg_pool2d(masks[rows].float(), grid)
        maps[image_of_row[rows], task_index[rows]] = pooled
    return maps


class TaskMapProbe(nn.Module):
    """A probe that stands in for what a pretrained SAM's image features hold, when the small system of
    [`small_config`] is trained from scratch (`benchmarks/learn_synthetic.py`; see docs/training.md, "Proof that it
    learns"): a 1x1 convolution on the embeddings after SAM's neck, or with `layer` on the output of that ViT layer
    (0-based, before the first pruning stage), names for every token the tasks whose target covers it (binary
    cross-entropy against [`task_maps`]). Trained next to the model's own losses and then dropped.

    Without it the mask losses, which reach the ViT only through the mask decoder, do not make it tell the objects
    apart by shape, by being large or by texture within the benchmark's budget: the model segments every object for
    those tasks. On the layer the prune decoder reads (`layer = prune_layers[0] - 1`) it stands in for the middle
    layers of a pretrained ViT-H, where the paper prunes: features that already tell the objects apart.

    [`watch`] hooks the probe onto the model; every forward then keeps the features (one per row with a `[SEG]`, or per
    image with `image_indices`, see `forward`) for the next call of the probe, which uses them once.
    """

    def __init__(self, config: VLTPConfig, num_tasks: int, layer: int | None = None):
        super().__init__()
        vision = config.vision_config
        if layer is not None and not 0 <= layer < vision.prune_layers[0]:
            raise ValueError(
                f"layer must be a ViT layer before the first pruning stage (0 to {vision.prune_layers[0] - 1}), "
                f"got {layer}"
            )
        self.layer = layer
        channels = vision.output_channels if layer is None else vision.hidden_size
        self.classifier = nn.Conv2d(channels, num_tasks, 1)
        self._features = None

    def watch(self, model: VLTPForTaskSegmentation) -> torch.utils.hooks.RemovableHandle:
        """Keep the features of every forward of `model`; remove the returned handle to stop."""
        encoder = model.vision_model.vision_encoder

        def keep(module, inputs, output):
            # The neck gives (N, C, grid, grid); a ViT layer (N, grid, grid, C).
            self._features = output if self.layer is None else output.permute(0, 3, 1, 2)

        return (encoder.neck if self.layer is None else encoder.layers[self.layer]).register_forward_hook(keep)

    def logits(self) -> torch.Tensor:
        """The probe's logits (N, num_tasks, grid, grid) on the features of the last forward of the watched model or
        of its vision model (one per image the ViT ran on), which it uses once."""
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("TaskMapProbe has no image features: call `watch(model)` before running the model")
        return self.classifier(features)

    def forward(self, outputs, maps, image_indices: torch.Tensor | None = None) -> torch.Tensor:
        """The probe's loss on the features of the last forward, whose output is `outputs`. `maps` (B, num_tasks,
        grid, grid): [`task_maps`] of each row's image, or with the forward's `image_indices` (one image per row) of
        each image it was given. A batch without `[SEG]` (SAM did not run) gives 0.

        The features are one per image of the `[SEG]` rows (a row, without `image_indices`), in index order, where
        the probed layer ran once per image: always before the first pruning stage, and on the neck when no stage
        pruned; else one per `[SEG]`."""
        rows = outputs.seg_sample_indices
        if len(rows) == 0:
            self._features = None
            return maps.new_zeros(())
        logits = self.logits()
        images = rows if image_indices is None else image_indices[rows]
        stages = zip(outputs.keep_indices or (), outputs.token_scores or ())
        pruned = any(kept.shape[-1] < scores.shape[-1] for kept, scores in stages)  # some stage kept fewer tokens
        targets = maps[images.unique()] if self.layer is not None or not pruned else maps[images]
        if len(logits) != len(targets):
            raise ValueError(f"The last forward made {len(logits)} image features for {len(targets)} task maps")
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
