"""[`convert_vltp`]: an untrained [`VLTPForTaskSegmentation`] and its [`VLTPProcessor`] from transformers' LLaVA and
a SAM checkpoint, and the helpers every VLTP conversion shares (writing, self-checks of LLaVA and of the SAM side)."""

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import save_torch_state_dict
from transformers import (
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SamConfig,
    SamImageProcessorPil,
    SamModel,
)
from transformers.utils import logging

from ..configuration_vltp import VLTPConfig, VLTPVisionConfig
from ..hub import HubError, hub_errors
from ..modeling_vltp import MAX_SHARD_SIZE, VLTPForTaskSegmentation, VLTPSamVisionModel
from ..processing_vltp import IMAGE_TOKEN, VLTPProcessor, add_vltp_special_tokens
from ..staging import staged_output
from .checkpoints import (
    CHECK_TOLERANCE,
    _config_dict,
    _quiet_transformers,
    check_output_dir,
    from_pretrained_checked,
    relative_error,
)
from .sam import (
    _TIED_SHARED_EMBEDDING,
    PROMPT_MASK_DECODER_FOLDER,
    _sam_reference,
    build_check_inputs,
    compare_sam_outputs,
    load_hf_sam,
    vltp_vision_model_from_sam,
)

logger = logging.get_logger(__name__)

# Largest relative error of LISA's logits in bfloat16 / float16, where two implementations round differently (a wrongly
# mapped weight is off by O(1)).
LOW_PRECISION_TOLERANCE = 5e-2
CHECK_TASK = "you can use the thing to open the bottle of beer"
_SAM_PARTS = ("shared_image_embedding.", "prompt_encoder.", "mask_decoder.")


def check_image() -> np.ndarray:
    """The fixed random RGB image of the self-checks: 48x64, so the CLIP processor crops and SAM's pads."""
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def _sam_image_processor(image_size: int) -> SamImageProcessorPil:
    """SAM's preprocessing (longest side to `image_size`, ImageNet mean/std, zero padding to a square)."""
    return SamImageProcessorPil(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size}
    )


def _sam_decoder_of(model: VLTPForTaskSegmentation) -> SamModel:
    """transformers' `SamModel` holding `model`'s own prompt encoder, mask decoder and positional embedding (shared,
    not copied; the image encoder is left empty): SAM's reference path for a point prompt."""
    config = model.config
    sam_config = SamConfig(
        vision_config={k: v for k, v in config.vision_config.to_dict().items() if k != "model_type"},
        prompt_encoder_config=config.prompt_encoder_config.to_dict(),
        mask_decoder_config=config.mask_decoder_config.to_dict(),
    )
    with torch.device("meta"):
        sam = SamModel(sam_config)
    parts = {key: value for key, value in model.state_dict().items() if key.startswith(_SAM_PARTS)}
    sam.load_state_dict(parts, strict=False, assign=True)
    return sam.to(model.dtype).eval()


def _sam_state_dict(sam: SamModel, vision: VLTPSamVisionModel) -> dict[str, torch.Tensor]:
    """The SAM side of a VLTP state dict: the pruned ViT under `vision_model.`, SAM's prompt encoder, mask decoder and
    positional embedding by their own names (its tied copy left out, as transformers saves it)."""
    state_dict = {f"vision_model.{key}": value for key, value in vision.state_dict().items()}
    state_dict.update(
        (key, value)
        for key, value in sam.state_dict().items()
        if key.startswith(_SAM_PARTS) and key != _TIED_SHARED_EMBEDDING
    )
    return state_dict


def _vltp_config(llava_config: LlavaConfig, sam: SamModel, vision: VLTPSamVisionModel, **kwargs) -> VLTPConfig:
    return VLTPConfig(
        llava_config=llava_config,
        vision_config=vision.config,
        prompt_encoder_config=sam.config.prompt_encoder_config,
        mask_decoder_config=sam.config.mask_decoder_config,
        **kwargs,
    )


def _llava_inputs(processor: VLTPProcessor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LLaVA's inputs for the self-check: the processor's prompt for [`check_image`] and `CHECK_TASK`, the pixels in
    the model's `dtype`."""
    inputs = processor(check_image(), CHECK_TASK)
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "pixel_values": inputs["pixel_values"].to(dtype),
    }


def _write_vltp(
    output_dir: Path,
    config: VLTPConfig,
    state_dict: dict[str, torch.Tensor],
    processor: VLTPProcessor,
    dtype: torch.dtype,
    fresh: tuple[str, ...] = (),
    check=None,
):
    """
    Write a `VLTPForTaskSegmentation` of `config` with `state_dict` and freshly initialised weights under the prefixes
    `fresh`, its embeddings resized to the processor's tokenizer, and `processor`, into `output_dir` (staged; see
    [`staged_output`]); `check(model, processor)` runs on the reloaded result before `output_dir` appears.

    The weights go through a raw checkpoint that `from_pretrained` reads, so that the missing weights and the
    non-persistent buffers are initialised by the model's own code, without building the model twice in memory.
    """
    with staged_output(output_dir) as staging:
        with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.raw-", dir=output_dir.parent) as raw:
            config.save_pretrained(raw)
            save_torch_state_dict(state_dict, raw, max_shard_size=MAX_SHARD_SIZE)
            del state_dict
            model = from_pretrained_checked(VLTPForTaskSegmentation, raw, "VLTP", allow_missing=fresh, dtype=dtype)
            # Never shrink: LLaVA-1.5's matrix has spare rows beyond its tokenizer, which may hold the new tokens.
            num_embeddings = model.get_input_embeddings().num_embeddings
            if len(processor.tokenizer) > num_embeddings:
                model.resize_token_embeddings(len(processor.tokenizer))
            model.save_pretrained(staging, max_shard_size=MAX_SHARD_SIZE)
            processor.save_pretrained(staging)
            del model
        with _quiet_transformers():
            model = VLTPForTaskSegmentation.from_pretrained(staging, dtype=dtype).eval()
            reloaded = VLTPProcessor.from_pretrained(staging)
        if check is not None:
            check(model, reloaded)


def _compare_llava(
    model: VLTPForTaskSegmentation,
    processor: VLTPProcessor,
    inputs: dict,
    expected: torch.Tensor,
    tolerance: float = CHECK_TOLERANCE,
):
    """Raise `ValueError` unless the reloaded processor prepares `inputs` again and `model`'s LLaVA gives the
    `expected` logits on them (over the source's vocabulary; added tokens have columns of their own) within
    `tolerance` (relative): the same layers, but a grown embedding matrix or another memory layout may round
    differently."""
    again = _llava_inputs(processor, model.dtype)
    if any(not torch.equal(again[key], value) for key, value in inputs.items()):
        raise ValueError("Conversion check failed: the saved processor prepares the check's prompt differently.")
    with torch.no_grad():
        logits = model.llava(**inputs).logits[..., : expected.shape[-1]]
    error = relative_error(logits.float(), expected.float())
    if not error <= tolerance:
        raise ValueError(f"Conversion check failed: LLaVA's logits differ from the source by {error:.2e} (relative).")


def _check_sam_side(model: VLTPForTaskSegmentation, reference, pixel_values, point):
    """Compare the reloaded `model`'s SAM (in float32, like the `reference`) with the source's outputs."""
    model.float()
    compare_sam_outputs(model.vision_model, _sam_decoder_of(model), reference, pixel_values, point)


def load_sam_for_vltp(
    source: str | os.PathLike, prune_layers=None, prune_rates=None, dtype: torch.dtype = torch.float32
) -> tuple[SamModel, VLTPSamVisionModel]:
    """
    SAM as transformers' `SamModel` and VLTP's pruned image encoder from either a transformers SAM checkpoint
    (`facebook/sam-vit-huge`; the prune decoder is then new) or the output of [`convert_sam`] (whose prune decoder is
    kept unless `prune_layers` / `prune_rates` ask for a new plan).
    """
    source = str(source)
    if _config_dict(source, "SAM").get("model_type") != VLTPVisionConfig.model_type:
        sam = load_hf_sam(source, dtype=dtype)
        return sam, vltp_vision_model_from_sam(sam, prune_layers, prune_rates).to(dtype)
    vision = from_pretrained_checked(VLTPSamVisionModel, source, "VLTP vision", dtype=dtype)
    sam = from_pretrained_checked(
        SamModel,
        source,
        "SAM prompt encoder and mask decoder",
        subfolder=PROMPT_MASK_DECODER_FOLDER,
        allow_missing=("vision_encoder.",),
        dtype=dtype,
    )
    try:
        sam.vision_encoder.load_state_dict(vision.vision_encoder.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source}: the image encoder does not fit {PROMPT_MASK_DECODER_FOLDER}/config.json: {error}")
    if prune_layers is not None or prune_rates is not None:
        vision = vltp_vision_model_from_sam(sam, prune_layers, prune_rates).to(dtype)
    return sam, vision


def load_llava(source: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """transformers' `LlavaForConditionalGeneration` and its processor (`llava-hf/llava-1.5-7b-hf` layout), refused
    unless every weight is there with its shape and the tokenizer's `<image>` is the model's image token."""
    source = str(source)
    if "mm_vision_tower" in _config_dict(source, "LLaVA"):
        raise ValueError(
            f"{source} is in LLaVA-v1's own layout (its config has mm_vision_tower), not transformers': convert LISA "
            "checkpoints with convert_lisa."
        )
    llava = from_pretrained_checked(LlavaForConditionalGeneration, source, "LLaVA", dtype=dtype)
    try:
        with hub_errors(source, "download"), _quiet_transformers():
            llava_processor = AutoProcessor.from_pretrained(source)
    except HubError:
        raise
    except Exception as error:
        raise ValueError(f"{source} has no usable LLaVA processor (tokenizer and image processor): {error}") from error
    tokenizer = llava_processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if IMAGE_TOKEN in tokenizer.get_vocab() else None
    if image_token_id != llava.config.image_token_id:
        raise ValueError(
            f"{source}: the tokenizer's {IMAGE_TOKEN} has id {image_token_id} but the model's image_token_id is "
            f"{llava.config.image_token_id}; the tokenizer does not belong to this model."
        )
    return llava, llava_processor


def _num_image_tokens(llava_config: LlavaConfig) -> int:
    """How many features LLaVA puts in place of one `<image>`: the vision tower's patches (and its CLS token with
    `vision_feature_select_strategy="full"`)."""
    vision = llava_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (llava_config.vision_feature_select_strategy == "full")


def convert_vltp(
    llava: str | os.PathLike,
    sam: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    prune_layers: list[int] | None = None,
    prune_rates: list[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """
    Build an untrained [`VLTPForTaskSegmentation`] and its [`VLTPProcessor`] from a transformers LLaVA checkpoint and
    a SAM checkpoint, check it against both, and return `output_dir`.

    The LLaVA's tokenizer gets `[SEG]` (and the embeddings grow if it does not fit), `seg_token_id` is set and the
    processor's `num_image_tokens` follows the LLaVA config; `text_hidden_fcs` is new, and so is the prune decoder
    unless `sam` is the output of [`convert_sam`]. Weights are written as safetensors shards of at most
    `MAX_SHARD_SIZE`, with an `auto_map` and the model files for `trust_remote_code=True`.

    The self-check reloads the result and compares LLaVA's logits on a fixed prompt and image with the source
    `LlavaForConditionalGeneration` (to float32 rounding), and the image embeddings without guidance and the masks
    for one point prompt with the source `SamModel`.

    Args:
        llava: a folder or Hub id in `llava-hf/llava-1.5-7b-hf`'s layout (`LlavaForConditionalGeneration` and its
            processor).
        sam: a folder or Hub id of a transformers `SamModel` (`facebook/sam-vit-huge`) or of [`convert_sam`]'s output.
        output_dir: the folder to create; it must not exist or be empty. It appears only when everything succeeded.
        prune_layers, prune_rates: the pruning plan (defaults: the paper's for that encoder, rate 0.5).
        dtype: the dtype of every weight of the result.

    Raises:
        FileNotFoundError: no checkpoint at `llava` or `sam`.
        FileExistsError: `output_dir` holds files.
        ValueError: not a LLaVA / SAM checkpoint, missing, extra or misshapen weights, a tokenizer that does not fit
            the model, or a failed self-check.
        HubError: a Hub id that cannot be downloaded.
    """
    output_dir = check_output_dir(output_dir)
    llava_model, llava_processor = load_llava(llava, dtype)
    sam_model, vision = load_sam_for_vltp(sam, prune_layers, prune_rates, dtype)
    tokenizer = llava_processor.tokenizer
    seg_token_id = add_vltp_special_tokens(tokenizer)["seg_token_id"]
    image_size = sam_model.config.vision_config.image_size
    processor = VLTPProcessor(
        llava_processor.image_processor,
        _sam_image_processor(image_size),
        tokenizer,
        num_image_tokens=_num_image_tokens(llava_model.config),
    )

    llava_inputs = _llava_inputs(processor, dtype)
    with torch.no_grad():
        llava_logits = llava_model(**llava_inputs).logits
    pixel_values, point = build_check_inputs(sam_model.config)
    sam_reference = _sam_reference(sam_model, pixel_values, point)

    config = _vltp_config(llava_model.config, sam_model, vision, seg_token_id=seg_token_id)
    state_dict = {f"llava.{key}": value for key, value in llava_model.state_dict().items()}
    state_dict.update(_sam_state_dict(sam_model, vision))
    del llava_model, sam_model, vision

    def check(model, reloaded):
        _compare_llava(model, reloaded, llava_inputs, llava_logits)
        _check_sam_side(model, sam_reference, pixel_values, point)

    _write_vltp(output_dir, config, state_dict, processor, dtype, fresh=("text_hidden_fcs.",), check=check)
    return output_dir
