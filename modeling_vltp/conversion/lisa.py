"""[`convert_lisa`]: a LISA checkpoint (`xinlai/LISA-7B-v1`'s layout, which VLTP finetunes from) to a
[`VLTPForTaskSegmentation`] and its [`VLTPProcessor`], checked against LISA's own computation."""

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    SamConfig,
)

from ..hub import hub_errors
from ..modeling_vltp import VLTPForTaskSegmentation
from ..processing_vltp import IMAGE_TOKEN, SEG_TOKEN, VLTPProcessor, add_vltp_special_tokens
from .checkpoints import (
    CHECK_TOLERANCE,
    _check_weights,
    _compare_shapes,
    _local_folder,
    _quiet_transformers,
    check_output_dir,
    from_pretrained_checked,
    read_state_dict,
)
from .llava import (
    LOW_PRECISION_TOLERANCE,
    _check_sam_side,
    _compare_llava,
    _llava_inputs,
    _num_image_tokens,
    _sam_image_processor,
    _sam_state_dict,
    _vltp_config,
    _write_vltp,
)
from .sam import (
    build_check_inputs,
    original_to_hf_key,
    sam_config_for_variant,
    sam_from_original_state_dict,
    segment_anything_reference,
    vltp_vision_model_from_sam,
)

# LLaVA-v1's system sentence (conv_llava_v1), which LISA's checkpoints were trained with.
LISA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the human's questions."
)
LISA_IMAGE_START, LISA_IMAGE_END = "<im_start>", "<im_end>"
# LISA's LLaMA config.json fields, which become the LLaVA text config (the others describe LLaVA-v1's vision side).
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)
_LISA_SAM_PREFIX = "model.visual_model."
_LISA_CLIP_PREFIX = "model.vision_tower.vision_tower."  # LLaVA-v1's CLIPVisionTower around a CLIPVisionModel
# LISA's names -> ours, first matching prefix wins (SAM's weights are renamed by `lisa_to_vltp_key`).
_LISA_PREFIXES = (
    ("model.text_hidden_fcs.0.", "text_hidden_fcs."),
    ("model.mm_projector.", "llava.model.multi_modal_projector.linear_1."),
    (_LISA_CLIP_PREFIX, "llava.model.vision_tower."),
    ("model.", "llava.model.language_model."),
    ("lm_head.", "llava.lm_head."),
)


def lisa_to_vltp_key(key: str, sam_config: SamConfig) -> str:
    """The name in [`VLTPForTaskSegmentation`] (with `projector="linear"`) of the LISA checkpoint's weight `key`."""
    if key.startswith(_LISA_SAM_PREFIX):
        key = original_to_hf_key(key.removeprefix(_LISA_SAM_PREFIX), sam_config)
        return f"vision_model.{key}" if key.startswith("vision_encoder.") else key
    for prefix, replacement in _LISA_PREFIXES:
        if key.startswith(prefix):
            return replacement + key.removeprefix(prefix)
    return key


def _lisa_reference_logits(
    lisa: dict[str, torch.Tensor], llava_config: LlavaConfig, inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """
    LISA's own computation of the logits on `inputs`, from its weights: CLIP's hidden states of the selected layer
    without the CLS token, through the single-Linear projector, in place of the image tokens of LLaMA's input
    embeddings (what LLaVA-v1's `prepare_inputs_labels_for_multimodal` does), then LLaMA. Independent of
    `LlavaForConditionalGeneration`.
    """
    dtype = lisa["model.mm_projector.weight"].dtype
    clip = CLIPVisionModel(llava_config.vision_config).to(dtype).eval()
    clip.load_state_dict(
        {
            key.removeprefix(_LISA_CLIP_PREFIX): value
            for key, value in lisa.items()
            if key.startswith(_LISA_CLIP_PREFIX)
        },
        strict=True,
    )
    llama = LlamaForCausalLM(llava_config.text_config).to(dtype).eval()
    llama.load_state_dict(
        {
            key: value
            for key, value in lisa.items()
            if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))
        },
        strict=True,
    )
    input_ids = inputs["input_ids"]
    is_image = input_ids == llava_config.image_token_id
    with torch.no_grad():
        hidden = clip(inputs["pixel_values"].to(dtype), output_hidden_states=True).hidden_states
        features = F.linear(
            hidden[llava_config.vision_feature_layer][:, 1:],
            lisa["model.mm_projector.weight"],
            lisa["model.mm_projector.bias"],
        )
        embeds = llama.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        embeds[is_image] = features.reshape(-1, embeds.shape[-1])
        return llama(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


def convert_lisa(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    sam_variant: str | SamConfig = "vit_h",
    prune_layers: list[int] | None = None,
    prune_rates: list[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """
    Convert a LISA checkpoint (`xinlai/LISA-7B-v1`'s layout, which VLTP finetunes from) into a
    [`VLTPForTaskSegmentation`] and its [`VLTPProcessor`], check it against LISA's own computation, and return
    `output_dir`.

    LISA's layout: LLaMA as `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`; the single-Linear
    `model.mm_projector`; CLIP as `model.vision_tower.vision_tower.*` (LISA's merge script usually drops it: it is then
    read from `vision_tower`); Meta's SAM under `model.visual_model.*`; `model.text_hidden_fcs.0.*`; a tokenizer with
    `[SEG]` (and `<im_start>`/`<im_end>` when its config has `mm_use_im_start_end`). The result has
    `projector="linear"`, `seg_hidden_state="before_seg"`, LISA's `[SEG]` id, and a processor with LLaVA-v1's prompt
    (system sentence, `<im_start><image><im_end>` where LISA uses them) and as many image tokens as CLIP has patches.
    `<image>` is added to the tokenizer (LISA marks images by a negative id) and gets a new embedding row. The prune
    decoder is new.

    The self-check reloads the result and compares LLaVA's logits with LISA's computation from the source weights
    (CLIP, projector and LLaMA run separately, see `_lisa_reference_logits`), and SAM with Meta's `segment_anything`
    when installed (else transformers' SAM), as [`convert_sam`] does. It needs about twice the model's size in memory.

    Args:
        input: a LISA folder or Hub id.
        output_dir: the folder to create; it must not exist or be empty. It appears only when everything succeeded.
        vision_tower: the CLIP checkpoint (a `CLIPModel` or `CLIPVisionModel` folder or Hub id) when `input` has no
            vision tower weights; defaults to the config's `mm_vision_tower` (`openai/clip-vit-large-patch14`).
        sam_variant: `"vit_b"`, `"vit_l"`, `"vit_h"` (LISA's) or a `SamConfig`.
        prune_layers, prune_rates: the pruning plan (defaults: the paper's for that encoder, rate 0.5).
        dtype: the dtype of every weight of the result.

    Raises:
        FileNotFoundError, FileExistsError, ValueError, HubError: as [`convert_vltp`].
    """
    output_dir = check_output_dir(output_dir)
    folder = _local_folder(input, "LISA")
    lisa_config = json.loads((folder / "config.json").read_text())
    if lisa_config.get("model_type") != "llava" or "mm_vision_tower" not in lisa_config:
        raise ValueError(
            f"{input} is not a LISA checkpoint: its config.json needs model_type 'llava' and LLaVA-v1's "
            "mm_vision_tower. For transformers' LLaVA (llava-hf) use convert_vltp."
        )
    lisa = {
        key: value.to(dtype) if value.is_floating_point() else value for key, value in read_state_dict(folder).items()
    }

    with hub_errors(str(input), "download"), _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    use_im_start_end = lisa_config.get("mm_use_im_start_end", False)
    needed = [SEG_TOKEN] + ([LISA_IMAGE_START, LISA_IMAGE_END] if use_im_start_end else [])
    if missing_tokens := [token for token in needed if token not in vocab]:
        raise ValueError(f"{input}: the tokenizer lacks {missing_tokens}, which LISA's checkpoints have.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # as LISA pads
    image_token_id = add_vltp_special_tokens(tokenizer)["image_token_id"]

    if not any(key.startswith(_LISA_CLIP_PREFIX) for key in lisa):
        vision_tower = str(vision_tower or lisa_config["mm_vision_tower"])
        clip = from_pretrained_checked(
            CLIPVisionModel,
            vision_tower,
            "CLIP vision tower",
            model_types=("clip", "clip_vision_model"),
            allow_unexpected=("text_model.", "text_projection.", "visual_projection.", "logit_scale"),
            dtype=dtype,
        )
        lisa.update((_LISA_CLIP_PREFIX + key, value) for key, value in clip.state_dict().items())
        clip_config = clip.config
        del clip
    else:
        with hub_errors(str(vision_tower or input), "download"):
            clip_config = CLIPVisionConfig.from_pretrained(vision_tower or lisa_config["mm_vision_tower"])

    sam_config = sam_config_for_variant(sam_variant) if isinstance(sam_variant, str) else sam_variant
    sam_weights = {
        key.removeprefix(_LISA_SAM_PREFIX): value for key, value in lisa.items() if key.startswith(_LISA_SAM_PREFIX)
    }
    sam = sam_from_original_state_dict(sam_weights, sam_config, f"{input} ({_LISA_SAM_PREFIX}*)")
    vision = vltp_vision_model_from_sam(sam, prune_layers, prune_rates).to(dtype)

    llava_config = LlavaConfig(
        vision_config=clip_config.to_dict(),
        text_config={"model_type": "llama", **{k: lisa_config[k] for k in _LLAMA_FIELDS if k in lisa_config}},
        image_token_id=image_token_id,
        vision_feature_layer=lisa_config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default",  # LLaVA-v1's "patch": the CLS token is dropped
        image_seq_length=(clip_config.image_size // clip_config.patch_size) ** 2,
        multimodal_projector_bias=True,
    )
    config = _vltp_config(
        llava_config,
        sam,
        vision,
        projector="linear",
        seg_hidden_state="before_seg",
        seg_token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN),
    )

    # Every weight LISA must have, by LISA's name, with the shape our model gives it (SAM's were checked above).
    with torch.device("meta"):
        expected = {
            key: value.shape
            for key, value in VLTPForTaskSegmentation(config).state_dict().items()
            if key.startswith(("llava.", "text_hidden_fcs."))
        }
    found = {
        lisa_to_vltp_key(key, sam_config): (key, value)
        for key, value in lisa.items()
        if not key.startswith(_LISA_SAM_PREFIX)
    }
    missing, unexpected, mismatched = _compare_shapes({k: v.shape for k, (_, v) in found.items()}, expected)
    vltp_to_lisa = {vltp_key: lisa_key for vltp_key, (lisa_key, _) in found.items()}
    _check_weights(
        str(input),
        "LISA",
        missing=missing,
        unexpected={vltp_to_lisa[key] for key in unexpected},
        mismatched={vltp_to_lisa[key]: shapes for key, shapes in mismatched.items()},
    )

    template = f"USER: {LISA_IMAGE_START}{IMAGE_TOKEN}{LISA_IMAGE_END}" if use_im_start_end else f"USER: {IMAGE_TOKEN}"
    processor = VLTPProcessor(
        CLIPImageProcessorPil(
            size={"shortest_edge": clip_config.image_size},
            crop_size={"height": clip_config.image_size, "width": clip_config.image_size},
        ),
        _sam_image_processor(sam_config.vision_config.image_size),
        tokenizer,
        num_image_tokens=_num_image_tokens(llava_config),
        prompt_template=f"{LISA_SYSTEM_PROMPT} {template}\n{{question}} ASSISTANT:",
    )
    llava_inputs = _llava_inputs(processor, dtype)
    llava_logits = _lisa_reference_logits(lisa, llava_config, llava_inputs)
    pixel_values, point = build_check_inputs(sam_config)
    sam_reference = segment_anything_reference(sam, sam_weights, pixel_values, point)

    state_dict = {key: value for key, (_, value) in found.items()}
    state_dict.update(_sam_state_dict(sam, vision))
    del lisa, sam_weights, sam, vision, found

    # LISA's computation is not LlavaForConditionalGeneration's: float32 or bfloat16 rounding apart.
    llava_tolerance = CHECK_TOLERANCE if dtype == torch.float32 else LOW_PRECISION_TOLERANCE

    def check(model, reloaded):
        _compare_llava(model, reloaded, llava_inputs, llava_logits, llava_tolerance)
        _check_sam_side(model, sam_reference, pixel_values, point)

    _write_vltp(output_dir, config, state_dict, processor, dtype, check=check)
    return output_dir
