"""Converting public Segment Anything checkpoints to VLTP's starting point.

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

import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import save_torch_state_dict, snapshot_download
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    SamConfig,
    SamImageProcessorPil,
    SamModel,
)
from transformers.utils import logging

from .configuration_vltp import SAM_VISION_PRESETS, VLTPConfig, VLTPVisionConfig
from .hub import MAX_SHARD_SIZE, HubError, hub_errors
from .modeling_vltp import VLTPForTaskSegmentation, VLTPSamVisionModel
from .processing_vltp import IMAGE_TOKEN, SEG_TOKEN, VLTPProcessor, add_vltp_special_tokens

logger = logging.get_logger(__name__)

PROMPT_MASK_DECODER_FOLDER = "sam_prompt_mask_decoder"
SAM_VARIANTS = tuple(SAM_VISION_PRESETS)
# Largest relative error (max |a - b| / max |b|) the self-check accepts between the conversion and its source (the
# same implementation, or Meta's): float32 rounding only; a wrongly mapped weight or LayerNorm eps is off by more.
CHECK_TOLERANCE = 1e-5
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
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")


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


def _compare_shapes(found: dict[str, torch.Size], expected: dict[str, torch.Size]):
    """The missing keys, unexpected keys, and `{key: (found shape, expected shape)}` of differently shaped ones."""
    mismatched = {
        key: (shape, expected[key]) for key, shape in found.items() if key in expected and shape != expected[key]
    }
    return expected.keys() - found.keys(), found.keys() - expected.keys(), mismatched


def _check_weights(source: str, model: str, missing, unexpected, mismatched: dict[str, tuple]):
    """Raise `ValueError` naming the first offending keys if the checkpoint `source` is not exactly `model` (a
    description such as "SAM vit_h")."""

    def first(keys):
        keys = sorted(keys)
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    if mismatched:
        key, (found, expected) = sorted(mismatched.items())[0]
        others = f" ({len(mismatched)} weights differ)" if len(mismatched) > 1 else ""
        raise ValueError(
            f"{source} does not match {model}: {key} has shape {tuple(found)}, expected {tuple(expected)}{others}. "
            "Wrong variant?"
        )
    if unexpected:
        raise ValueError(f"{source} has weights that {model} does not have: {first(unexpected)}. Wrong variant?")
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} weights of {model}: {first(missing)}. Truncated checkpoint?")


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


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' loading reports (they list every key of a partial checkpoint) for the block."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _config_dict(source: str, what: str, subfolder: str = "") -> dict:
    """The config dict of the checkpoint `source` (a folder or a Hub id); `FileNotFoundError` without a config.json."""
    local = Path(source).expanduser()
    if (local.exists() or not _HUB_ID.fullmatch(source)) and not (local / subfolder / "config.json").is_file():
        raise FileNotFoundError(f"No {what} checkpoint at {local / subfolder} (no config.json).")
    with hub_errors(source, "download"):
        config, _ = PreTrainedConfig.get_config_dict(source, subfolder=subfolder)
    return config


def from_pretrained_checked(
    model_class: type[PreTrainedModel],
    source: str | os.PathLike,
    what: str,
    describe=lambda config: None,
    *,
    model_types: tuple[str, ...] = (),
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
    **kwargs,
) -> PreTrainedModel:
    """
    `model_class.from_pretrained(source, **kwargs)` that refuses a checkpoint of another model type (`model_types`,
    default: the class's own), or one whose weights are not all there with the shapes its config says
    (`from_pretrained` alone would initialise them at random). Missing weights whose names start with one of
    `allow_missing`, and extra ones starting with one of `allow_unexpected`, are accepted.

    `what` names the kind of checkpoint in errors ("transformers SAM"); `describe(config)` the exact model, when it
    can say more ("SAM vit_h").
    """
    source = str(source)
    model_types = model_types or (model_class.config_class.model_type,)
    model_type = _config_dict(source, what, kwargs.get("subfolder", "")).get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{source} is not a {what} checkpoint: its config.json has model_type {model_type!r}, expected "
            f"{' or '.join(map(repr, model_types))}."
        )
    try:
        with hub_errors(source, "download"), _quiet_transformers():
            model, info = model_class.from_pretrained(
                source, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except HubError:
        raise
    except Exception as error:  # e.g. truncated safetensors, which safetensors reports with its own exception type
        raise ValueError(f"Cannot read the {what} checkpoint {source}: {error}") from error
    _check_weights(
        source,
        describe(model.config) or what,
        missing={key for key in info["missing_keys"] if not key.startswith(allow_missing)},
        unexpected={key for key in info["unexpected_keys"] if not key.startswith(allow_unexpected)},
        mismatched={key: (found, expected) for key, found, expected in info["mismatched_keys"]},
    )
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


# -- checking a conversion against its source ----------------------------------------------------------------------


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


def check_inputs(config: SamConfig) -> tuple[torch.Tensor, torch.Tensor]:
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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


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


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """`output_dir` as a `Path`; `FileExistsError` if it holds anything (a conversion never overwrites)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not an empty folder; choose a new --output-dir.")
    return output_dir


@contextlib.contextmanager
def staged_output(output_dir: Path):
    """
    Yield a hidden staging folder next to `output_dir`, renamed to `output_dir` when the block succeeds and removed
    when it fails, so that a refused or failed conversion leaves no partial output.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# -- the conversion -------------------------------------------------------------------------------------------------


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
        pixel_values, point = check_inputs(config)
        reference = segment_anything_reference(sam, original, pixel_values, point)
    elif source == "hf":
        sam = load_hf_sam(input, config)
        pixel_values, point = check_inputs(sam.config)
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


# -- VLTPForTaskSegmentation from LLaVA and SAM, or from LISA --------------------------------------------------------

# Largest relative error of LISA's logits in bfloat16 / float16, where two implementations round differently (a wrongly
# mapped weight is off by O(1)).
LOW_PRECISION_TOLERANCE = 5e-2
CHECK_TASK = "you can use the thing to open the bottle of beer"
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
_SAM_PARTS = ("shared_image_embedding.", "prompt_encoder.", "mask_decoder.")
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
    pixel_values, point = check_inputs(sam_model.config)
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


def _local_folder(source: str | os.PathLike, what: str) -> Path:
    """`source` as a local folder: itself, or the Hub repository's config, tokenizer and weight files downloaded."""
    local = Path(source).expanduser()
    if local.is_dir() or not _HUB_ID.fullmatch(str(source)):
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"No {what} checkpoint at {local} (no config.json).")
        return local
    with hub_errors(str(source), "download"):
        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.model", "*.safetensors", "*.bin"]))


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers-style checkpoint folder: `model.safetensors` or `pytorch_model.bin`, single or
    sharded with an index (memory-mapped, not read into memory)."""
    for weights_name in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{weights_name}.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
        if (folder / weights_name).is_file():
            files = [weights_name]
            break
    else:
        raise FileNotFoundError(f"No weights in {folder} (model.safetensors or pytorch_model.bin, or their index).")
    state_dict = {}
    for name in files:
        try:
            if name.endswith(".safetensors"):
                state_dict.update(load_file(folder / name))
            else:
                state_dict.update(torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True))
        except Exception as error:
            raise ValueError(f"Cannot read {folder / name}: {error}") from error
    return state_dict


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
    pixel_values, point = check_inputs(sam_config)
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


__all__ = [
    "MAX_SHARD_SIZE",
    "PROMPT_MASK_DECODER_FOLDER",
    "SAM_VARIANTS",
    "build_segment_anything",
    "check_output_dir",
    "compare_sam_outputs",
    "convert_sam",
    "convert_lisa",
    "convert_vltp",
    "from_pretrained_checked",
    "import_segment_anything_modeling",
    "load_hf_sam",
    "load_llava",
    "load_original_sam",
    "load_sam_for_vltp",
    "lisa_to_vltp_key",
    "original_to_hf_key",
    "read_state_dict",
    "sam_from_original_state_dict",
    "staged_output",
    "sam_config_for_variant",
    "vltp_vision_model_from_sam",
]
