"""Processor of VLTP: from (image, task) pairs to the inputs of `VLTPForTaskSegmentation`, and from its low-resolution
mask logits back to masks at each image's own size.

This file imports only torch, numpy, PIL and transformers: it is copied to the Hub next to the processor files so that
`AutoProcessor.from_pretrained(..., trust_remote_code=True)` works without this package installed.
"""

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AddedToken, BatchFeature, ProcessorMixin

from .configuration_vltp import without_remote_code

SEG_TOKEN = "[SEG]"
IMAGE_TOKEN = "<image>"

# LLaVA-1.5's chat format: one user turn holding the image and the question, then the assistant's turn. (LISA's own
# checkpoints were trained with the llava_v1 system sentence in front: pass it in `prompt_template` for those.)
DEFAULT_PROMPT_TEMPLATE = f"USER: {IMAGE_TOKEN}\n{{question}} ASSISTANT:"
# LISA's question and answer for a sentence-long query (`LONG_QUESTION_LIST`, `ANSWER_LIST` of LISA's utils).
DEFAULT_QUESTION_TEMPLATE = "{task} Please output segmentation mask."
DEFAULT_ANSWER = f"Sure, {SEG_TOKEN}."
# Images more elongated than this are refused: SAM's longest-side resize would leave the short side a few pixels (or
# none) and CLIP's shortest-side resize would make the long side enormous.
MAX_ASPECT_RATIO = 50


def load_image(path) -> Image.Image:
    """
    Opens an image file as the RGB image a person sees: the EXIF orientation is applied (so masks come out in the
    displayed orientation) and 16-bit grayscale is scaled to 8 bits (`convert("RGB")` alone would clip it to black and
    white). `path` is a path or a binary file object, which errors name by its `name` attribute.

    Raises:
        `FileNotFoundError`: no such file.
        `ValueError`: PIL cannot read it (not an image, truncated, or over PIL's decompression-bomb limit
            `PIL.Image.MAX_IMAGE_PIXELS`); the one-line message names the file.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        name = path if _is_path(path) else getattr(path, "name", path)
        raise ValueError(f"cannot read image {name}: {reason}") from None


def _is_path(value) -> bool:
    return isinstance(value, str) or hasattr(value, "__fspath__")


def _to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB; integer modes ("I", "I;16", ...) hold 16-bit samples and are scaled by 255 / 65535."""
    if image.mode.startswith("I"):
        pixels = np.round(np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257).astype(np.uint8)
        image = Image.fromarray(pixels)
    return image.convert("RGB")


def add_vltp_special_tokens(tokenizer) -> dict[str, int]:
    """
    Adds the tokens VLTP needs to `tokenizer`, when missing, and returns their ids.

    `<image>` is added as a special token: it only marks where the image features go and is dropped by
    `decode(..., skip_special_tokens=True)`. `[SEG]` is added as a whole (never split, never normalised) but not as a
    special token, as LISA does, so that a decoded answer still reads "Sure, [SEG].".

    Adding tokens grows the vocabulary: resize the model's embeddings afterwards with
    [`resize_embeddings_for_tokenizer`].

    Returns:
        `dict[str, int]`: `{"image_token_id": ..., "seg_token_id": ...}`.
    """
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if SEG_TOKEN not in vocab:
        tokenizer.add_tokens([AddedToken(SEG_TOKEN, special=False, normalized=False)])
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "seg_token_id": tokenizer.convert_tokens_to_ids(SEG_TOKEN),
    }


def resize_embeddings_for_tokenizer(model, tokenizer) -> int:
    """
    Resizes the input (and tied or untied output) token embeddings of `model` to `len(tokenizer)`, e.g. after
    [`add_vltp_special_tokens`], and returns the new vocabulary size.

    `model` is anything with a transformers-style `resize_token_embeddings` (a `PreTrainedModel` such as
    `LlavaForConditionalGeneration` or `VLTPForTaskSegmentation`); new rows are initialised as that method does.
    """
    return model.resize_token_embeddings(len(tokenizer)).num_embeddings


class VLTPProcessor(ProcessorMixin):
    r"""
    Turns (image, task) pairs into the inputs of `VLTPForTaskSegmentation`: the LLaVA-1.5 chat prompt with LISA's
    question, LLaVA's CLIP pixels, SAM's pixels (longest side resized to SAM's input size, normalised, zero-padded to
    a square), and for training the answer's labels and the target masks in SAM's frame.

    The two image processors are separate attributes: `image_processor` (LLaVA's CLIP processor) and
    `sam_image_processor` (SAM's). In transformers 5, `ProcessorMixin` treats every `__init__` argument whose name
    contains "image_processor" as a sub-processor: `save_pretrained` writes both, each under its own key, into one
    `processor_config.json` next to the tokenizer files, and `from_pretrained` loads `image_processor` with
    `AutoImageProcessor` and rebuilds `sam_image_processor` from its saved class name and settings. Both are saved
    under their backend-neutral class names (`CLIPImageProcessor`, `SamImageProcessor`), so loading picks the
    torchvision backend when it is installed and the PIL one otherwise.

    Prompts are never truncated, since that could cut the image tokens. The answer's `[SEG]` token is not a special
    token (see [`add_vltp_special_tokens`]), so `decode(..., skip_special_tokens=True)` keeps it.

    Args:
        image_processor ([`CLIPImageProcessor`]):
            LLaVA's image processor (resize the shortest side, center crop, CLIP mean/std), gives `pixel_values`.
        sam_image_processor ([`SamImageProcessor`]):
            SAM's image processor, gives `sam_pixel_values`, `original_sizes` and `reshaped_input_sizes`.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The LLM's tokenizer, holding `<image>` and `[SEG]` (see [`add_vltp_special_tokens`]) and a pad token.
        num_image_tokens (`int`, *optional*, defaults to 576):
            How many `<image>` tokens one image becomes in the prompt: `(crop_size / patch_size) ** 2`, the patch
            features LLaVA keeps with `vision_feature_select_strategy="default"` (CLS dropped). 576 for LLaVA-1.5
            (336 px, patch 14), 256 for LISA's 224 px CLIP ViT-L/14.
        prompt_template (`str`, *optional*, defaults to `"USER: <image>\n{question} ASSISTANT:"`):
            The chat prompt, with one `<image>` and a `{question}` field.
        question_template (`str`, *optional*, defaults to `"{task} Please output segmentation mask."`):
            LISA's question around the task, with a `{task}` field.
    """

    def __init__(
        self,
        image_processor=None,
        sam_image_processor=None,
        tokenizer=None,
        num_image_tokens=576,
        prompt_template=DEFAULT_PROMPT_TEMPLATE,
        question_template=DEFAULT_QUESTION_TEMPLATE,
        **kwargs,
    ):
        if prompt_template.count(IMAGE_TOKEN) != 1 or "{question}" not in prompt_template:
            raise ValueError(
                f"`prompt_template` needs exactly one {IMAGE_TOKEN} and a {{question}} field, got {prompt_template!r}."
            )
        if "{task}" not in question_template:
            raise ValueError(f"`question_template` needs a {{task}} field, got {question_template!r}.")
        if tokenizer is not None:
            missing = [token for token in (IMAGE_TOKEN, SEG_TOKEN) if token not in tokenizer.get_vocab()]
            if missing:
                raise ValueError(
                    f"The tokenizer lacks {missing}: call `add_vltp_special_tokens(tokenizer)` first, then "
                    "`resize_embeddings_for_tokenizer(model, tokenizer)`."
                )
        self.num_image_tokens = num_image_tokens
        self.prompt_template = prompt_template
        self.question_template = question_template
        super().__init__(image_processor, sam_image_processor, tokenizer, **kwargs)

    @property
    def seg_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(SEG_TOKEN)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "sam_pixel_values"]

    def control_tokens(self) -> list[str]:
        """The tokenizer's special tokens, its other added special tokens, `<image>` and `[SEG]`: the strings that
        would become control tokens if they appeared in user text."""
        added = (token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special)
        return sorted({*self.tokenizer.all_special_tokens, *added, IMAGE_TOKEN, SEG_TOKEN})

    def check_text(self, text, name: str, max_seg_tokens: int = 0) -> None:
        """
        Refuses user text (a task, or an answer with `max_seg_tokens=1`) holding a control token: a typed `<image>`
        would add image tokens, `</s>` or `<pad>` would end or pad the sequence, a second `[SEG]` would be decoded as
        the mask query. The `ValueError` names `name` and the token.
        """
        if not isinstance(text, str):
            raise TypeError(f"{name} is a {type(text).__name__}; expected a string.")
        typed = [token for token in self.control_tokens() if token in text and token != SEG_TOKEN]
        if typed or (max_seg_tokens == 0 and SEG_TOKEN in text):
            raise ValueError(
                f"{name} contains {(typed or [SEG_TOKEN])[0]!r}, a control token of the tokenizer: user text must not "
                f"hold one. Text: {text!r:.200}"
            )
        if text.count(SEG_TOKEN) > max_seg_tokens:
            raise ValueError(
                f"{name} holds {SEG_TOKEN} {text.count(SEG_TOKEN)} times; at most {max_seg_tokens} is allowed. "
                f"Text: {text!r:.200}"
            )

    def save_pretrained(self, save_directory, *args, remote_code: bool = True, **kwargs):
        """`ProcessorMixin.save_pretrained`. The package registers `VLTPProcessor` for `AutoProcessor`, so the folder
        (or the pushed repository) gets an `auto_map` and the processor files and loads with
        `trust_remote_code=True` without this package; with `remote_code=False` it gets neither."""
        if remote_code:
            return super().save_pretrained(save_directory, *args, **kwargs)
        sub_processors = [getattr(self, name) for name in self.get_attributes() if name != "tokenizer"]
        with without_remote_code(self, *sub_processors):
            return super().save_pretrained(save_directory, *args, **kwargs)

    def build_prompt(self, task: str) -> str:
        """The chat prompt for one task, with a single `<image>` placeholder (expanded only when tokenising)."""
        return self.prompt_template.format(question=self.question_template.format(task=task))

    def __call__(
        self,
        images,
        tasks,
        answers=None,
        masks=None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """
        Prepares one row per (image, task) pair; to run several tasks on one image, repeat the image.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, a path, or a list of them):
                RGB images: PIL images of mode "RGB", `(H, W, 3)` uint8 arrays, or image files, opened with
                [`load_image`] (EXIF orientation applied). At most 1:50 elongated.
            tasks (`str` or `list[str]`):
                One task per image, e.g. "you can use the thing to open the bottle of beer". A task holding a control
                token (`<image>`, `[SEG]`, `</s>`, `<pad>`, any special token of the tokenizer) is refused.
            answers (`str` or `list[str]`, *optional*):
                For training: the assistant's answer of each row, or one answer for all rows (`DEFAULT_ANSWER`,
                LISA's "Sure, [SEG]."). The answer and the end-of-sequence token are appended to the prompt and
                `labels` are returned. An answer holds one `[SEG]`, or none when it says that nothing in the image
                fits (its row then trains the language model only), and no other control token. Leave out for
                inference, where the prompt ends with the assistant's turn.
            masks (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                For training: one binary target mask per row (0/1 or boolean), of its image's size `(H, W)`.
            padding_side (`str`, *optional*):
                "right" or "left"; defaults to the tokenizer's (right for training). Batched generation needs "left"
                so that every row ends with its prompt.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                Tensor type of the outputs.

        Returns:
            [`BatchFeature`] with, for a batch of B rows padded to length L and SAM's input size S:
            - `input_ids`, `attention_mask` (B, L): `<image>` is expanded to `num_image_tokens` image tokens;
            - `pixel_values` (B, 3, h, w): LLaVA's CLIP pixels;
            - `sam_pixel_values` (B, 3, S, S): SAM's pixels;
            - `original_sizes`, `reshaped_input_sizes` (B, 2): each image's (H, W) before and after SAM's resize;
            - `labels` (B, L), when `answers` are given: `input_ids` on the answer and end-of-sequence tokens, -100
              on the prompt, the image tokens and the padding;
            - `masks` (B, S, S) float {0, 1}, when `masks` are given: each mask resized like its image into SAM's
              frame with nearest-neighbour resampling (so it stays binary) and zero-padded like the image.
        """
        images, tasks = _as_list(images), _as_list(tasks)
        if not images:
            raise ValueError("Got no images: pass at least one (image, task) pair.")
        batch_size = len(images)
        _check_batch_size("tasks", tasks, batch_size)
        if isinstance(answers, str):
            answers = [answers] * batch_size
        if answers is not None:
            _check_batch_size("answers", answers, batch_size)
        for index, task in enumerate(tasks):
            self.check_text(task, f"Task {index}")
        for index, answer in enumerate(answers or []):
            self.check_text(answer, f"Answer {index}", max_seg_tokens=1)
        images = [
            load_image(image) if isinstance(image, str) or hasattr(image, "__fspath__") else image for image in images
        ]
        image_sizes = [_check_rgb_image(image, index) for index, image in enumerate(images)]
        longest_edge = self.sam_image_processor.size["longest_edge"]
        for index, (height, width) in enumerate(image_sizes):
            if max(height, width) > MAX_ASPECT_RATIO * min(height, width) or (
                int(min(height, width) * longest_edge / max(height, width) + 0.5) < 1
            ):
                raise ValueError(
                    f"Image {index} is {height}x{width} (height x width): too elongated for SAM's {longest_edge} px "
                    f"input (at most 1:{MAX_ASPECT_RATIO}); crop it into less elongated pieces."
                )

        prompts = [self.build_prompt(task).replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens) for task in tasks]
        texts = prompts
        if answers is not None:
            texts = [f"{prompt} {answer}{self.tokenizer.eos_token}" for prompt, answer in zip(prompts, answers)]
        text_inputs = self.tokenizer(
            texts,
            padding=True,
            padding_side=padding_side,
            return_offsets_mapping=answers is not None,
            return_tensors="pt",
        )
        data = {"input_ids": text_inputs["input_ids"], "attention_mask": text_inputs["attention_mask"]}
        if answers is not None:
            # A token belongs to the answer when its characters reach past the prompt. Tokens the tokenizer inserts
            # (BOS) and padding have empty offsets and stay out.
            answer_starts = torch.tensor([len(prompt) for prompt in prompts])[:, None]
            is_answer = (text_inputs["offset_mapping"][..., 1] > answer_starts) & (data["attention_mask"] == 1)
            data["labels"] = torch.where(is_answer, data["input_ids"], -100)

        data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]

        sam_kwargs = {}
        if masks is not None:
            masks = _as_list(masks)
            _check_batch_size("masks", masks, batch_size)
            sam_kwargs = {
                "segmentation_maps": [
                    _check_mask(mask, size, index) for index, (mask, size) in enumerate(zip(masks, image_sizes))
                ],
                # Resize and pad the masks exactly like the images (SAM's own mask settings target 256 x 256).
                "mask_size": dict(self.sam_image_processor.size),
                "mask_pad_size": dict(self.sam_image_processor.pad_size),
            }
        sam_inputs = self.sam_image_processor(images, return_tensors="pt", **sam_kwargs)
        data["sam_pixel_values"] = sam_inputs["pixel_values"]
        data["original_sizes"] = sam_inputs["original_sizes"]
        data["reshaped_input_sizes"] = sam_inputs["reshaped_input_sizes"]
        if masks is not None:
            data["masks"] = sam_inputs["labels"].float()

        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_masks(
        self, mask_logits, original_sizes, reshaped_input_sizes, binarize: bool = True
    ) -> list[torch.Tensor]:
        """
        Brings low-resolution mask logits back to each image's own size, as SAM and LISA do: upsample to SAM's input
        size, crop the padding, resize to the original size (bilinear), then threshold the logits at 0.

        Args:
            mask_logits (`torch.Tensor` of shape `(B, 1, h, w)` or `(B, h, w)`):
                One mask per row, e.g. the model's `pred_masks`.
            original_sizes, reshaped_input_sizes (`torch.Tensor` of shape `(B, 2)` or lists of (H, W)):
                As returned by the processor call.
            binarize (`bool`, *optional*, defaults to `True`):
                Return boolean masks; otherwise the resized logits.

        Returns:
            `list[torch.Tensor]`: B masks, the i-th of shape `original_sizes[i]`.
        """
        if mask_logits.ndim == 3:
            mask_logits = mask_logits[:, None]
        if mask_logits.ndim != 4 or mask_logits.shape[1] != 1:
            raise ValueError(
                f"Expected mask logits of shape (B, 1, h, w) or (B, h, w), got {tuple(mask_logits.shape)}."
            )
        if not len(mask_logits) == len(original_sizes) == len(reshaped_input_sizes):
            raise ValueError(
                f"Got {len(mask_logits)} masks, {len(original_sizes)} original sizes and {len(reshaped_input_sizes)} "
                "reshaped input sizes; they must match."
            )
        masks = self.sam_image_processor.post_process_masks(
            list(mask_logits.float().split(1)), original_sizes, reshaped_input_sizes, binarize=binarize
        )
        return [mask[0, 0] for mask in masks]


def _as_list(items) -> list:
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _check_batch_size(name: str, items: list, batch_size: int):
    if len(items) != batch_size:
        raise ValueError(
            f"Got {batch_size} images but {len(items)} {name}: pass one per image (to run several tasks on one image, "
            "repeat the image)."
        )


def _check_rgb_image(image, index: int) -> tuple[int, int]:
    """Checks that `image` is an RGB image and returns its (height, width)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(
                f"Image {index} has PIL mode {image.mode!r} but VLTP expects RGB images: open files with "
                "`load_image(path)`, which also scales 16-bit images, or convert with `image.convert('RGB')`."
            )
        return image.height, image.width
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"Image {index} is an array of shape {image.shape} and dtype {image.dtype} but VLTP expects RGB "
                "images as (H, W, 3) uint8 arrays: convert it, e.g. `np.asarray(load_image(path))`."
            )
        return image.shape[0], image.shape[1]
    raise TypeError(f"Image {index} is a {type(image).__name__}; expected a PIL image or a numpy array.")


def _check_mask(mask, image_size: tuple[int, int], index: int) -> np.ndarray:
    """Checks that `mask` is a binary mask of `image_size` (height, width) and returns it as a uint8 array."""
    mask = np.asarray(mask)
    if mask.shape != image_size:
        raise ValueError(
            f"Mask {index} has shape {mask.shape} but its image is {image_size[0]}x{image_size[1]} (height x width): "
            "a mask must have its image's size."
        )
    values = np.unique(mask)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(
            f"Mask {index} is not binary: it holds values such as {values[:4].tolist()}. Pass 0/1 or boolean masks "
            "(for a 0/255 mask image, `np.asarray(mask) > 127`)."
        )
    return mask.astype(np.uint8)


__all__ = [
    "DEFAULT_ANSWER",
    "IMAGE_TOKEN",
    "SEG_TOKEN",
    "VLTPProcessor",
    "add_vltp_special_tokens",
    "load_image",
    "resize_embeddings_for_tokenizer",
]
