"""[`convert_sam`]: converting public Segment Anything checkpoints to VLTP's starting point.

[`convert_sam`] reads SAM in transformers' layout (`facebook/sam-vit-{base,large,huge}`) or in Meta's original layout
(`sam_vit_h_4b8939.pth`: `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) and writes

    OUT/config.json, OUT/model.safetensors, OUT/configuration_vltp.py, OUT/modeling_vltp.py
        a `VLTPSamVisionModel`: SAM's image encoder with a freshly initialised prune decoder, with an `auto_map` and
        the model files so that it also loads with `trust_remote_code=True`;
    OUT/sam_prompt_mask_decoder/config.json, OUT/sam_prompt_mask_decoder/model.safetensors
        SAM's prompt encoder, mask decoder and `shared_image_embedding`, as a `SamModel` checkpoint (its `SamConfig`
        in full) holding only those weights; `SamModel.from_pretrained` reads it (the image encoder is then missing).

The conversion refuses inputs that are not complete SAM checkpoints of the expected size, checks its result against
the source implementation (transformers' SAM, or Meta's `segment_anything` when installed) and writes the output
folder only once everything has passed.
"""

import copy
import importlib.util
import os
import re
import sys
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import save_file
from transformers import (
    SamConfig,
    SamModel,
)
from transformers.utils import logging

from ..configuration_vltp import SAM_VISION_PRESETS, VLTPVisionConfig
from ..modeling_vltp import VLTPSamVisionModel
from ..staging import staged_output
from .checkpoints import (
    CHECK_TOLERANCE,
    _check_weights,
    _compare_shapes,
    _quiet_transformers,
    check_output_dir,
    from_pretrained_checked,
    relative_error,
)

logger = logging.get_logger(__name__)

PROMPT_MASK_DECODER_FOLDER = "sam_prompt_mask_decoder"
SAM_VARIANTS = tuple(SAM_VISION_PRESETS)
# The LayerNorm eps of Meta's segment_anything (hence LISA's and VLTP's SAM), where transformers' configs differ: the
# two-way transformer of the mask decoder uses nn.LayerNorm's default 1e-5 (transformers: mask_decoder_config's
# layer_norm_eps, 1e-6 by default). Everything else agrees: the ViT's LayerNorms 1e-6 (build_sam's norm_layer;
# vision_config.layer_norm_eps), LayerNorm2d's 1e-6 in the neck, the mask downscaling (prompt_encoder_config's
# layer_norm_eps) and the upscaling (fixed in both), and the final attention LayerNorm 1e-5 (fixed in both).
SEGMENT_ANYTHING_LAYER_NORM_EPS = {"vision_config": 1e-6, "prompt_encoder_config": 1e-6, "mask_decoder_config": 1e-5}


# Meta's parameter names -> transformers' `SamModel` names, applied in order. The MLP heads of the mask decoder are
# renamed by `_rename_mask_decoder_mlp`, which needs their depth.
_ORIGINAL_TO_HF_RULES = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"^vision_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^vision_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^vision_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^vision_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^vision_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^vision_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (
        r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
        "shared_image_embedding.positional_embedding",
    ),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
_MASK_DECODER_MLP = re.compile(
    r"^mask_decoder\.(?P<head>output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(?P<index>\d+)\.(?P<rest>.+)$"
)
# transformers ties the prompt encoder's copy of the positional embedding to this one (Meta's model has one).
_SHARED_EMBEDDING = "shared_image_embedding.positional_embedding"
_TIED_SHARED_EMBEDDING = "prompt_encoder.shared_embedding.positional_embedding"


def sam_config_for_variant(variant: str) -> SamConfig:
    """The `SamConfig` of Meta's `vit_b`, `vit_l` or `vit_h` (prompt encoder and mask decoder are the same for all)."""
    if variant not in SAM_VISION_PRESETS:
        raise ValueError(f"Unknown SAM variant {variant!r}; expected one of {', '.join(SAM_VARIANTS)}.")
    return SamConfig(vision_config=dict(SAM_VISION_PRESETS[variant]))


def with_segment_anything_eps(config: SamConfig) -> SamConfig:
    """A copy of `config` whose LayerNorm eps are those of Meta's segment_anything (`SEGMENT_ANYTHING_LAYER_NORM_EPS`),
    so that transformers' `SamModel` of it computes what Meta's `Sam` computes."""
    config = copy.deepcopy(config)
    for part, eps in SEGMENT_ANYTHING_LAYER_NORM_EPS.items():
        getattr(config, part).layer_norm_eps = eps
    return config


def original_to_hf_key(key: str, config: SamConfig) -> str:
    """The name in transformers' `SamModel` of the parameter `key` of Meta's `Sam` (unknown names are kept)."""
    for pattern, replacement in _ORIGINAL_TO_HF_RULES:
        key = re.sub(pattern, replacement, key)
    if match := _MASK_DECODER_MLP.match(key):
        # Meta's MLP keeps its layers in one list; transformers' has proj_in, layers (the middle ones) and proj_out.
        depth = config.mask_decoder_config.iou_head_depth if match["head"] == "iou_prediction_head" else 3
        index = int(match["index"])
        layer = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
        key = f"mask_decoder.{match['head']}.{layer}.{match['rest']}"
    return key


def _describe(config: SamConfig) -> str:
    vision = config.vision_config
    for variant, preset in SAM_VISION_PRESETS.items():
        if all(getattr(vision, name) == value for name, value in preset.items()):
            return f"SAM {variant}"
    return f"SAM (hidden size {vision.hidden_size}, {vision.num_hidden_layers} layers)"


def _expected_shapes(config: SamConfig) -> dict[str, torch.Size]:
    """Every weight of transformers' `SamModel` of `config` and its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {key: value.shape for key, value in SamModel(config).state_dict().items()}


def load_original_sam(path: str | os.PathLike, config: SamConfig) -> tuple[SamModel, dict[str, torch.Tensor]]:
    """
    Read Meta's SAM checkpoint (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) into transformers' `SamModel`
    of `config`. Returns the model and Meta's state dict.

    Raises `FileNotFoundError` if there is no file, `ValueError` if it is unreadable, or not exactly SAM of `config`
    (missing, extra or differently shaped weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No SAM checkpoint at {path}.")
    try:
        original = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Cannot read {path} as a PyTorch checkpoint: {error}") from error
    if not isinstance(original, dict) or not all(isinstance(value, torch.Tensor) for value in original.values()):
        raise ValueError(f"{path} is not a state dict of tensors (Meta's SAM checkpoints are).")

    return sam_from_original_state_dict(original, config, str(path)), original


def sam_from_original_state_dict(original: dict[str, torch.Tensor], config: SamConfig, source: str) -> SamModel:
    """transformers' `SamModel` of `config`, with Meta's LayerNorm eps (see [`with_segment_anything_eps`]), holding the
    tensors of Meta's state dict `original` (not copied). Raises `ValueError` naming Meta's keys (those of `source`)
    unless it is exactly SAM of `config`."""
    config = with_segment_anything_eps(config)
    state_dict = {original_to_hf_key(key, config): value for key, value in original.items()}
    if _SHARED_EMBEDDING in state_dict:
        state_dict[_TIED_SHARED_EMBEDDING] = state_dict[_SHARED_EMBEDDING]
    # Errors name Meta's keys, the ones the user's file has.
    hf_to_original = {original_to_hf_key(key, config): key for key in original}
    hf_to_original[_TIED_SHARED_EMBEDDING] = hf_to_original.get(_SHARED_EMBEDDING, _TIED_SHARED_EMBEDDING)
    missing, unexpected, mismatched = _compare_shapes(
        {key: value.shape for key, value in state_dict.items()}, _expected_shapes(config)
    )
    _check_weights(
        source,
        _describe(config),
        missing={hf_to_original.get(key, key) for key in missing},
        unexpected={hf_to_original[key] for key in unexpected},
        mismatched={hf_to_original[key]: shapes for key, shapes in mismatched.items()},
    )
    with torch.device("meta"):
        model = SamModel(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load_hf_sam(name_or_path: str | os.PathLike, config: SamConfig | None = None, **kwargs) -> SamModel:
    """
    Load a transformers `SamModel` checkpoint (a folder or a Hub id) and refuse it unless every weight is there with
    the shape its config (or `config`, if given) says. `kwargs` go to `from_pretrained`.
    """
    source = str(name_or_path)
    model = from_pretrained_checked(SamModel, source, "transformers SAM", _describe, **kwargs)
    if config is not None:
        found = {key: value.shape for key, value in model.state_dict().items()}
        _check_weights(source, _describe(config), *_compare_shapes(found, _expected_shapes(config)))
    return model


def vltp_vision_model_from_sam(
    sam: SamModel, prune_layers: list[int] | None = None, prune_rates: list[float] | None = None
) -> VLTPSamVisionModel:
    """A `VLTPSamVisionModel` with SAM's image encoder weights and a freshly initialised prune decoder (the paper's
    pruning plan for that encoder unless `prune_layers` / `prune_rates` say otherwise). Its guidance is as wide as
    SAM's prompt embeddings, since the projected `[SEG]` state is both."""
    fields = {**sam.config.vision_config.to_dict(), "guidance_dim": sam.config.prompt_encoder_config.hidden_size}
    if prune_layers is not None:
        fields["prune_layers"] = prune_layers
    if prune_rates is not None:
        fields["prune_rates"] = prune_rates
    model = VLTPSamVisionModel(VLTPVisionConfig.from_dict(fields))
    model.vision_encoder.load_state_dict(sam.vision_encoder.state_dict(), strict=True)
    return model.eval()


def save_prompt_mask_decoder(sam: SamModel, folder: Path):
    """Save SAM's prompt encoder, mask decoder and shared positional embedding as a `SamModel` checkpoint."""
    folder.mkdir(parents=True)
    sam.config.save_pretrained(folder)
    weights = {
        key: value.contiguous()
        for key, value in sam.state_dict().items()
        if not key.startswith("vision_encoder.") and key != _TIED_SHARED_EMBEDDING  # tied, as transformers saves it
    }
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def import_segment_anything_modeling() -> ModuleType | None:
    """
    Meta's `segment_anything.modeling` (the SAM model classes), or None if segment-anything is not installed.

    It is loaded under a private name without running `segment_anything/__init__.py`, which imports the predictor and
    through it torchvision; the model classes need only torch.
    """
    name = "_vltp_segment_anything_modeling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0], "modeling")
    modeling_spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(modeling_spec)
    sys.modules[name] = module
    try:
        modeling_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def build_segment_anything(modeling: ModuleType, config: SamConfig) -> torch.nn.Module:
    """Meta's `Sam` with the sizes of `config` (what `segment_anything.build_sam` does for its three variants)."""
    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    grid = vision.image_size // vision.patch_size
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=vision.num_hidden_layers,
            embed_dim=vision.hidden_size,
            img_size=vision.image_size,
            mlp_ratio=vision.mlp_dim / vision.hidden_size,
            norm_layer=partial(torch.nn.LayerNorm, eps=vision.layer_norm_eps),
            num_heads=vision.num_attention_heads,
            patch_size=vision.patch_size,
            qkv_bias=vision.qkv_bias,
            use_rel_pos=vision.use_rel_pos,
            global_attn_indexes=list(vision.global_attn_indexes),
            window_size=vision.window_size,
            out_chans=vision.output_channels,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=prompt.hidden_size,
            image_embedding_size=(grid, grid),
            input_image_size=(vision.image_size, vision.image_size),
            mask_in_chans=prompt.mask_input_channels,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=decoder.num_multimask_outputs,
            transformer=modeling.TwoWayTransformer(
                depth=decoder.num_hidden_layers,
                embedding_dim=decoder.hidden_size,
                mlp_dim=decoder.mlp_dim,
                num_heads=decoder.num_attention_heads,
            ),
            transformer_dim=decoder.hidden_size,
            iou_head_depth=decoder.iou_head_depth,
            iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        ),
    )


def build_check_inputs(config: SamConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random image of SAM's input size and one foreground point at its centre, `(1, 1, 2)` in pixels."""
    size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return pixel_values, torch.tensor([[[size / 2, size / 2]]])


@torch.no_grad()
def hf_sam_outputs(sam: SamModel, pixel_values: torch.Tensor, point: torch.Tensor, image_embeddings=None):
    """Image embeddings, multimask masks `(1, 3, h, w)` and IoU scores `(1, 3)` of transformers' SAM for one point."""
    if image_embeddings is None:
        image_embeddings = sam.vision_encoder(pixel_values).last_hidden_state
    outputs = sam(
        image_embeddings=image_embeddings,
        input_points=point[:, None],
        input_labels=torch.ones(1, 1, 1, dtype=torch.long),
        multimask_output=True,
    )
    return image_embeddings, outputs.pred_masks[:, 0], outputs.iou_scores[:, 0]


@torch.no_grad()
def segment_anything_outputs(sam: torch.nn.Module, pixel_values: torch.Tensor, point: torch.Tensor):
    """The same three outputs from Meta's `Sam`."""
    image_embeddings = sam.image_encoder(pixel_values)
    sparse, dense = sam.prompt_encoder(points=(point, torch.ones(1, 1, dtype=torch.long)), boxes=None, masks=None)
    masks, iou_scores = sam.mask_decoder(
        image_embeddings=image_embeddings,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    return image_embeddings, masks, iou_scores


def _sam_reference(sam: SamModel, pixel_values: torch.Tensor, point: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[`hf_sam_outputs`] of `sam` in float32 (a copy if it is not): SAM is checked in float32 (Meta's prompt encoder
    only runs in float32, and bfloat16 rounding would hide a wrong weight's error)."""
    return hf_sam_outputs(sam if sam.dtype == torch.float32 else copy.deepcopy(sam).float(), pixel_values, point)


def segment_anything_reference(
    sam: SamModel, original: dict[str, torch.Tensor], pixel_values: torch.Tensor, point: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The outputs a conversion from Meta's layout is checked against, in float32: Meta's `segment_anything` holding
    the state dict `original`, or, when segment-anything is not installed, `sam` (transformers' SAM of it)."""
    modeling = import_segment_anything_modeling()
    if modeling is None:
        logger.warning("segment-anything is not installed: checking the conversion against transformers' SAM only.")
        return _sam_reference(sam, pixel_values, point)
    meta_sam = build_segment_anything(modeling, sam.config)
    meta_sam.load_state_dict(original, strict=True)  # float32, the weights rounded if they are not
    return segment_anything_outputs(meta_sam.eval(), pixel_values, point)


def compare_sam_outputs(
    vision: VLTPSamVisionModel,
    decoder: SamModel,
    reference: tuple[torch.Tensor, ...],
    pixel_values: torch.Tensor,
    point: torch.Tensor,
    tolerance: float = CHECK_TOLERANCE,
):
    """
    Compare a converted SAM with the source's `reference` outputs: the image embeddings of `vision` without guidance
    (no pruning), and the masks and IoU scores of `decoder`'s prompt encoder + mask decoder given the reference image
    embeddings. Raises `ValueError` beyond `tolerance` (relative).
    """
    expected_embeddings, expected_masks, expected_iou = reference
    with torch.no_grad():
        embeddings = vision(pixel_values.to(vision.dtype)).last_hidden_state
    _, masks, iou = hf_sam_outputs(decoder, pixel_values, point, image_embeddings=expected_embeddings)
    for name, actual, expected in (
        ("image embeddings", embeddings, expected_embeddings),
        ("masks", masks, expected_masks),
        ("IoU scores", iou, expected_iou),
    ):
        error = relative_error(actual.float(), expected.float())
        if not error <= tolerance:
            raise ValueError(f"Conversion check failed: {name} differ from the source by {error:.2e} (relative).")


def check_converted(
    folder: Path,
    reference: tuple[torch.Tensor, ...],
    pixel_values: torch.Tensor,
    point: torch.Tensor,
):
    """Load the output of [`convert_sam`] from `folder` and compare it with the source's `reference` outputs (see
    [`compare_sam_outputs`])."""
    with _quiet_transformers():
        vision = VLTPSamVisionModel.from_pretrained(folder).eval()
        decoder = SamModel.from_pretrained(folder / PROMPT_MASK_DECODER_FOLDER).eval()
    compare_sam_outputs(vision, decoder, reference, pixel_values, point)


def convert_sam(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    source: str = "hf",
    variant: str | SamConfig | None = None,
    prune_layers: list[int] | None = None,
    prune_rates: list[float] | None = None,
) -> Path:
    """
    Convert a SAM checkpoint into a `VLTPSamVisionModel` checkpoint plus SAM's prompt encoder and mask decoder (layout
    in the module docstring), check it against the source, and return `output_dir`.

    Args:
        input: `source="hf"`: a folder or Hub id of a transformers `SamModel` checkpoint (`facebook/sam-vit-huge`);
            `source="original"`: Meta's `.pth` file (`sam_vit_h_4b8939.pth`).
        output_dir: the folder to create; it must not exist or be empty. It appears only when everything succeeded.
        source: `"hf"` or `"original"`.
        variant: `"vit_b"`, `"vit_l"` or `"vit_h"`, or a `SamConfig`. Required for `"original"` (the file holds no
            config); for `"hf"`, the checkpoint's config must match it if given.
        prune_layers, prune_rates: the pruning plan (defaults: the paper's for that encoder, rate 0.5).

    Raises:
        FileNotFoundError: no checkpoint at `input`.
        FileExistsError: `output_dir` holds files.
        ValueError: unreadable input, or not exactly SAM of `variant` (missing, extra or misshapen weights); a
            pruning plan that does not fit the encoder; a self-check that failed.
    """
    output_dir = check_output_dir(output_dir)
    config = sam_config_for_variant(variant) if isinstance(variant, str) else variant

    if source == "original":
        if config is None:
            raise ValueError(f"Meta's checkpoints carry no config: give the variant ({', '.join(SAM_VARIANTS)}).")
        sam, original = load_original_sam(input, config)
        pixel_values, point = build_check_inputs(config)
        reference = segment_anything_reference(sam, original, pixel_values, point)
    elif source == "hf":
        sam = load_hf_sam(input, config)
        pixel_values, point = build_check_inputs(sam.config)
        reference = hf_sam_outputs(sam, pixel_values, point)
    else:
        raise ValueError(f"Unknown source {source!r}: expected 'hf' (transformers' layout) or 'original' (Meta's).")
    vision = vltp_vision_model_from_sam(sam, prune_layers, prune_rates)

    with staged_output(output_dir) as staging:
        vision.save_pretrained(staging)
        save_prompt_mask_decoder(sam, staging / PROMPT_MASK_DECODER_FOLDER)
        del vision, sam
        check_converted(staging, reference, pixel_values, point)
    return output_dir
