"""Checked loading of checkpoints (refusing incomplete, misshapen or foreign ones with one-line errors), the output
folder's check, and the self-checks' error measure."""

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging

from ..hub import HubError, hub_errors

# Largest relative error (max |a - b| / max |b|) the self-check accepts between the conversion and its source (the
# same implementation, or Meta's): float32 rounding only; a wrongly mapped weight or LayerNorm eps is off by more.
CHECK_TOLERANCE = 1e-5

_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")


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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """`output_dir` as a `Path`; `FileExistsError` if it holds anything (a conversion never overwrites)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not an empty folder; choose a new --output-dir.")
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
