"""convert_sam: transformers' and Meta's SAM checkpoints to VLTP's starting point, checked against transformers' SAM
and Meta's segment_anything, and the inputs it must refuse without leaving output behind."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import SamConfig, SamModel

from modeling_vltp import VLTPSamVisionModel
from modeling_vltp.conversion import (
    PROMPT_MASK_DECODER_FOLDER,
    build_check_inputs,
    build_segment_anything,
    convert_sam,
    hf_sam_outputs,
    original_to_hf_key,
    relative_error,
    sam_config_for_variant,
    segment_anything_outputs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_sam_config() -> SamConfig:
    """A 4x4-token SAM with 3x3 windows (so the grid is padded to 6x6, as SAM pads 64 to 70) and two global layers."""
    return SamConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=64,
            window_size=3,  # 4x4 tokens padded to 6x6, as SAM pads 64 to 70
            global_attn_indexes=[1, 3],
            output_channels=16,
            num_pos_feats=8,
            mlp_dim=64,
        ),
        prompt_encoder_config=dict(hidden_size=16, mask_input_channels=4, image_size=64, patch_size=16),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=32),
    )


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random values for every parameter and buffer, LayerNorms included (SAM zero-initialises its relative
    positions)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    return module.eval()


# Every weight of a Meta SAM source drawn with this std, LayerNorms included: activations then stay small enough for
# the LayerNorm eps to matter, as in a real checkpoint (with std 0.2 a wrong eps hides below float32 rounding).
META_SAM_STD = 0.02


def with_layer_norm_eps(sam: SamModel, eps: float) -> SamModel:
    """A copy of `sam` whose mask decoder's two-way transformer uses LayerNorm `eps`."""
    config = copy.deepcopy(sam.config)
    config.mask_decoder_config.layer_norm_eps = eps
    other = SamModel(config).eval()
    other.load_state_dict(sam.state_dict())
    return other


@pytest.fixture
def hf_checkpoint(tmp_path) -> tuple[Path, SamModel]:
    sam = randomize(SamModel(tiny_sam_config()))
    sam.tie_weights()
    sam.save_pretrained(tmp_path / "sam-hf")
    return tmp_path / "sam-hf", sam


@pytest.fixture
def original_checkpoint(tmp_path, segment_anything) -> tuple[Path, torch.nn.Module]:
    # Seed 1: with these weights transformers' default eps would miss Meta's masks by 6e-5 (checked in the test).
    sam = randomize(build_segment_anything(segment_anything, tiny_sam_config()), seed=1, std=META_SAM_STD)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path, sam


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# The same float32 computation by two code paths (another class, another tensor shape, or another process), compared
# relative to the output's largest value: each op may round differently by a few ulps (u = 6e-8), which through the
# tiny models' layers stays below 1e-6 (1.9e-9 absolute seen between two of them on an AMD EPYC, 6e-8 between two
# processes); 1e-5 leaves a margin, and a wrongly mapped weight or LayerNorm eps is off by more (see the eps tests).
FLOAT32_TOLERANCE = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = FLOAT32_TOLERANCE):
    """`actual` has `expected`'s shape and dtype and is within `tolerance` of it, relative to its largest value."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert relative_error(actual, expected) <= tolerance, f"{relative_error(actual, expected):.2e} > {tolerance:.0e}"


# -- successful conversions -----------------------------------------------------------------------------------------


def test_convert_hf_checkpoint(tmp_path, hf_checkpoint):
    source_dir, source = hf_checkpoint
    output_dir = convert_sam(source_dir, tmp_path / "out", source="hf", prune_layers=[2], prune_rates=[0.25])

    assert sorted(path.name for path in output_dir.iterdir()) == [
        "config.json",
        "configuration_vltp.py",
        "model.safetensors",
        "modeling_vltp.py",
        PROMPT_MASK_DECODER_FOLDER,
    ]
    assert sorted(path.name for path in (output_dir / PROMPT_MASK_DECODER_FOLDER).iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_vltp.VLTPSamVisionModel"
    assert config["model_type"] == "vltp_sam_vision" and config["architectures"] == ["VLTPSamVisionModel"]
    assert config["prune_layers"] == [2] and config["prune_rates"] == [0.25] and config["hidden_size"] == 32
    with safe_open(output_dir / PROMPT_MASK_DECODER_FOLDER / "model.safetensors", "pt") as weights:
        decoder_keys = set(weights.keys())
    assert decoder_keys == {key for key in source.state_dict() if not key.startswith("vision_encoder.")} - {
        "prompt_encoder.shared_embedding.positional_embedding"  # tied to shared_image_embedding, saved once
    }
    assert leftovers(tmp_path) == []

    pixel_values, point = build_check_inputs(source.config)
    expected_embeddings, expected_masks, expected_iou = hf_sam_outputs(source, pixel_values, point)
    vision = VLTPSamVisionModel.from_pretrained(output_dir).eval()
    with torch.no_grad():  # VLTP's encoder against SamVisionEncoder, another SamModel: two code paths
        assert_close(vision(pixel_values).last_hidden_state, expected_embeddings)
        guided = vision(pixel_values, guidance_embeds=torch.randn(1, vision.config.guidance_dim))
    assert guided.keep_indices[0].shape == (1, 12)  # the fresh prune decoder runs: 16 tokens, rate 0.25
    decoder = SamModel.from_pretrained(output_dir / PROMPT_MASK_DECODER_FOLDER).eval()
    _, masks, iou = hf_sam_outputs(decoder, pixel_values, point, image_embeddings=expected_embeddings)
    assert_close(masks, expected_masks)
    assert_close(iou, expected_iou)


def test_convert_original_checkpoint_matches_segment_anything(tmp_path, original_checkpoint):
    path, meta_sam = original_checkpoint
    output_dir = convert_sam(path, tmp_path / "out", source="original", variant=tiny_sam_config())
    vision = VLTPSamVisionModel.from_pretrained(output_dir).eval()
    decoder = SamModel.from_pretrained(output_dir / PROMPT_MASK_DECODER_FOLDER).eval()
    assert vision.config.prune_layers == []  # the paper's plan needs three global layers; this encoder has two

    # Meta's two-way transformer has nn.LayerNorm's eps; the rest of SAM has 1e-6 in both libraries.
    assert decoder.config.mask_decoder_config.layer_norm_eps == 1e-5
    assert vision.config.layer_norm_eps == decoder.config.prompt_encoder_config.layer_norm_eps == 1e-6

    pixel_values, point = build_check_inputs(tiny_sam_config())
    expected_embeddings, expected_masks, expected_iou = segment_anything_outputs(meta_sam, pixel_values, point)
    _, masks, iou = hf_sam_outputs(decoder, pixel_values, point, image_embeddings=expected_embeddings)
    # Meta's attention code rounds differently from transformers' in float32 (4e-7 here, a few float32 ulps through
    # two layers); 1e-5 is the conversion's own check. A wrong eps misses by more, as transformers' 1e-6 shows:
    assert_close(masks, expected_masks)
    assert_close(iou, expected_iou)
    _, wrong_eps_masks, _ = hf_sam_outputs(
        with_layer_norm_eps(decoder, 1e-6), pixel_values, point, image_embeddings=expected_embeddings
    )
    assert relative_error(wrong_eps_masks, expected_masks) > 1e-5
    # In float64 (u = 1e-16) the image encoders agree to rounding (Meta's prompt encoder only runs in float32).
    with torch.no_grad():
        expected = meta_sam.image_encoder.double()(pixel_values.double())
        assert_close(vision.double()(pixel_values.double()).last_hidden_state, expected, tolerance=1e-12)


@pytest.mark.parametrize("variant", ["vit_b", "vit_h"])
def test_original_key_mapping_covers_every_weight_of_sam(segment_anything, variant):
    config = sam_config_for_variant(variant)
    with torch.device("meta"):
        meta_keys = build_segment_anything(segment_anything, config).state_dict().keys()
        hf_keys = SamModel(config).state_dict().keys()
    mapped = {original_to_hf_key(key, config) for key in meta_keys}
    assert len(mapped) == len(meta_keys)
    # transformers keeps a tied copy of the positional embedding in the prompt encoder; Meta's model has one.
    assert mapped == hf_keys - {"prompt_encoder.shared_embedding.positional_embedding"}


def test_cli_converts_an_hf_checkpoint(tmp_path, hf_checkpoint):
    source_dir, source = hf_checkpoint
    output_dir = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "hub" / "convert_sam.py"),
            "--source=hf",
            f"--input={source_dir}",
            f"--output-dir={output_dir}",
            "--prune-layers=1,3",
            "--prune-rates=0.5,0.25",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(str(output_dir))
    config = json.loads((output_dir / "config.json").read_text())
    assert config["prune_layers"] == [1, 3] and config["prune_rates"] == [0.5, 0.25]
    assert (output_dir / PROMPT_MASK_DECODER_FOLDER / "config.json").is_file()


# -- refusals: a clear error and no output --------------------------------------------------------------------------


def _original_with(tmp_path, original_checkpoint, edit) -> Path:
    path, meta_sam = original_checkpoint
    state_dict = dict(meta_sam.state_dict())
    edit(state_dict)
    edited = tmp_path / "edited.pth"
    torch.save(state_dict, edited)
    return edited


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (
            lambda state: state.pop("mask_decoder.iou_token.weight"),
            r"lacks 1 weights of SAM \(hidden size 32, 4 layers\): mask_decoder\.iou_token\.weight\. Truncated",
        ),
        (
            lambda state: state.update({"image_encoder.blocks.1.attn.rel_pos_h": torch.zeros(5, 16)}),
            r"image_encoder\.blocks\.1\.attn\.rel_pos_h has shape \(5, 16\), expected \(7, 16\)\. Wrong variant\?",
        ),
        (
            lambda state: state.update({"image_encoder.blocks.4.norm1.weight": torch.zeros(32)}),
            r"has weights that SAM \(hidden size 32, 4 layers\) does not have: "
            r"image_encoder\.blocks\.4\.norm1\.weight",
        ),
    ],
    ids=["missing-key", "wrong-shape", "extra-key"],
)
def test_refuses_mismatched_original_checkpoints(tmp_path, original_checkpoint, edit, error):
    path = _original_with(tmp_path, original_checkpoint, edit)
    with pytest.raises(ValueError, match=rf"^{path} .*{error}"):
        convert_sam(path, tmp_path / "out", source="original", variant=tiny_sam_config())
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_refuses_the_wrong_variant(tmp_path, original_checkpoint):
    path, _ = original_checkpoint
    with pytest.raises(ValueError, match=r"does not match SAM vit_b: image_encoder\..* Wrong variant\?"):
        convert_sam(path, tmp_path / "out", source="original", variant="vit_b")
    assert not (tmp_path / "out").exists()


def test_refuses_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"^Cannot read {garbage} as a PyTorch checkpoint"):
        convert_sam(garbage, tmp_path / "out", source="original", variant="vit_b")
    with pytest.raises(FileNotFoundError, match="No SAM checkpoint at"):
        convert_sam(tmp_path / "missing.pth", tmp_path / "out", source="original", variant="vit_b")
    with pytest.raises(
        FileNotFoundError, match=r"No transformers SAM checkpoint at .*missing-dir \(no config\.json\)"
    ):
        convert_sam(tmp_path / "missing-dir", tmp_path / "out", source="hf")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_refuses_truncated_incomplete_and_mismatched_hf_checkpoints(tmp_path, hf_checkpoint):
    source_dir, _ = hf_checkpoint
    weights_file = source_dir / "model.safetensors"
    weights = load_file(weights_file)

    with pytest.raises(ValueError, match=r"^.*sam-hf does not match SAM vit_b: .* Wrong variant\?"):
        convert_sam(source_dir, tmp_path / "out", source="hf", variant="vit_b")

    save_file({k: v for k, v in weights.items() if k != "vision_encoder.neck.conv2.weight"}, weights_file)
    with pytest.raises(
        ValueError, match=r"lacks 1 weights of SAM .*: vision_encoder\.neck\.conv2\.weight\. Truncated"
    ):
        convert_sam(source_dir, tmp_path / "out", source="hf")

    full = weights_file.read_bytes()
    weights_file.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=rf"^Cannot read the transformers SAM checkpoint {source_dir}"):
        convert_sam(source_dir, tmp_path / "out", source="hf")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_refuses_a_non_empty_output_folder(tmp_path, hf_checkpoint):
    source_dir, _ = hf_checkpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out exists and is not an empty folder"):
        convert_sam(source_dir, tmp_path / "out", source="hf")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]
