"""Sharing checkpoints: model cards, push and pull over HTTP on 127.0.0.1 (our stand-in Hub, and olah, an independent
Hub-compatible server), remote code in a process without this package, and clear Hub errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import ALICE_TOKEN, BOB_TOKEN, free_port, use_hub_endpoint
from huggingface_hub import HfApi, ModelCard, constants
from packaging import version
from test_conversion import FLOAT32_TOLERANCE, assert_close
from test_vision_model import tiny_model, tiny_vision_config
from transformers import AutoModel

from modeling_vltp import VLTPForTaskSegmentation, VLTPSamVisionModel, VLTPVisionConfig, count_gmacs, vision_gmacs
from modeling_vltp.hub import HubError, hub_errors, model_card, push_to_hub_with_card
from modeling_vltp.testing import run_without_package, tiny_model_and_processor, tiny_processor

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "testorg/vltp-tiny"
FULL_REPO_ID = "testorg/vltp-tiny-system"
ADAPTER_REPO_ID = "testorg/vltp-tiny-lora"


def model_inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 160, 160, generator=generator), torch.randn(1, 24, generator=generator)


def outputs_of(model, pixel_values, guidance):
    with torch.no_grad():
        dense = model(pixel_values).last_hidden_state
        pruned = model(pixel_values, guidance_embeds=guidance)
    return dense, pruned.last_hidden_state, pruned.keep_indices


def assert_same_outputs(actual, expected):
    for a, e in zip(actual[:2], expected[:2]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    for a, e in zip(actual[2], expected[2]):
        assert torch.equal(a, e)


# -- model card -----------------------------------------------------------------------------------------------------


def test_model_card_states_weights_pruning_compute_metrics_usage_and_paper():
    model = tiny_model()
    card = model_card(
        model,
        REPO_ID,
        base_model="facebook/sam-vit-huge",
        metrics={"gIoU": 0.6123, "cIoU": 0.5871},
        metrics_dataset="RIO test (common split)",
    )
    metadata = ModelCard(card).data
    assert metadata.base_model == "facebook/sam-vit-huge"
    assert metadata.library_name == "transformers" and metadata.license == "apache-2.0"
    assert "facebook/sam-vit-huge" in card.split("## Weights")[1]
    # tiny_vision_config: 10x10 tokens, stages after layers 2 and 4 at rates 0.5 and 0.7.
    assert "| 1 | 2 of 6 | 0.5 | 50 of 100 |" in card and "| 2 | 4 of 6 | 0.7 | 30 of 100 |" in card
    assert "Measured on RIO test (common split)." in card and "| gIoU | 0.6123 |" in card
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card
    assert "arXiv:2409.08464" in card and "https://arxiv.org/abs/2409.08464" in card

    # The GMACs are those of the same encoder at 1024x1024, counted independently here.
    with torch.device("meta"):
        full_size = VLTPSamVisionModel(tiny_vision_config(image_size=1024))
        pixel_values, guidance = torch.empty(1, 3, 1024, 1024), torch.empty(1, 24)
    dense, pruned = (
        count_gmacs(full_size, pixel_values),
        count_gmacs(full_size, pixel_values, guidance_embeds=guidance),
    )
    assert f"| without pruning | {dense:.1f} |" in card
    assert f"| with the pruning above | {pruned:.1f} ({pruned / dense:.1%}) |" in card


def test_card_gmacs_of_sam_vit_h_match_the_papers_count():
    config = VLTPVisionConfig.vit_h()
    dense, pruned = vision_gmacs(config, [0.0, 0.0]), vision_gmacs(config)
    # SAM ViT-H's image encoder: 2980.5 GMACs counted on transformers' SamVisionModel; the paper reports 2976.
    assert dense == pytest.approx(2980.5, abs=1.0)
    assert 0.5 * dense < pruned < 0.8 * dense


def test_model_card_refuses_metrics_without_their_data():
    with pytest.raises(ValueError, match="metrics_dataset"):
        model_card(tiny_model(), REPO_ID, metrics={"gIoU": 0.5})


# -- push and pull through the stand-in Hub -------------------------------------------------------------------------


def test_push_model_and_processor_then_pull(hub):
    model = tiny_model()
    processor = tiny_processor(sam_image_size=160)
    commit_url = push_to_hub_with_card(model, REPO_ID, base_model="facebook/sam-vit-huge")
    assert commit_url.startswith(f"{hub.url}/{REPO_ID}/commit/")
    processor_commit_url = push_to_hub_with_card(processor, REPO_ID)

    api = HfApi()
    files = set(api.list_repo_files(REPO_ID))
    assert {"README.md", "config.json", "model.safetensors", "configuration_vltp.py", "modeling_vltp.py"} <= files
    assert {"processor_config.json", "processing_vltp.py", "tokenizer.json"} <= files
    assert api.model_info(REPO_ID).sha == processor_commit_url.rsplit("/", 1)[1]
    # The processor's push kept the model's card.
    readme = Path(api.hf_hub_download(REPO_ID, "README.md")).read_text()
    assert readme == model_card(model, REPO_ID, base_model="facebook/sam-vit-huge")
    config = json.loads(Path(api.hf_hub_download(REPO_ID, "config.json")).read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vltp.VLTPVisionConfig",
        "AutoModel": "modeling_vltp.VLTPSamVisionModel",
    }

    pixel_values, guidance = model_inputs()
    for loaded in (VLTPSamVisionModel.from_pretrained(REPO_ID), AutoModel.from_pretrained(REPO_ID)):
        assert type(loaded) is VLTPSamVisionModel
        assert_same_outputs(
            outputs_of(loaded.eval(), pixel_values, guidance), outputs_of(model, pixel_values, guidance)
        )


def test_push_to_another_namespace_is_permission_denied(hub):
    with pytest.raises(HubError) as error:
        push_to_hub_with_card(tiny_model(), "bob/vltp-tiny")
    message = str(error.value)
    assert "'bob/vltp-tiny'" in message and "permission denied" in message and "\n" not in message
    assert not (hub.store.root / "models" / "bob").exists()


def test_push_to_an_existing_repo_of_another_user_is_permission_denied(hub):
    push_to_hub_with_card(tiny_model(), REPO_ID)
    with pytest.raises(HubError, match=rf"'{REPO_ID}': permission denied .*HTTP 403"):
        push_to_hub_with_card(tiny_model(seed=1), REPO_ID, token=BOB_TOKEN)


def test_pull_of_a_missing_repository_is_a_clear_error(hub):
    with pytest.raises(HubError, match=r"^Cannot download 'testorg/missing': the repository does not exist") as error:
        with hub_errors("testorg/missing", "download"):
            VLTPSamVisionModel.from_pretrained("testorg/missing")
    assert "\n" not in str(error.value)


def test_push_offline_is_a_clear_error(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=rf"^Cannot push to '{REPO_ID}': offline mode is on \(HF_HUB_OFFLINE=1\)"):
        push_to_hub_with_card(tiny_model(), REPO_ID)
    assert hub.requests == []


def test_push_to_an_unreachable_endpoint_is_a_clear_error(tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    use_hub_endpoint(monkeypatch, endpoint, tmp_path / "hf_home")
    with pytest.raises(HubError, match=rf"^Cannot push to '{REPO_ID}': the Hub at {endpoint} cannot be reached"):
        push_to_hub_with_card(tiny_model(), REPO_ID, token=ALICE_TOKEN)


def test_push_cli_reports_errors_in_one_line(tmp_path, hub):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hub" / "push.py"), "--model", str(model_dir), "--repo-id", "bob/vltp-tiny"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Cannot push to 'bob/vltp-tiny': offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local "
        "cache."
    )


# -- remote code in a process where modeling_vltp cannot be imported -------------------------------------------------

# Runs through `run_without_package` (a fresh `python -I` in which `modeling_vltp` cannot be imported); the
# remote-code copies live in `transformers_modules.*` and are unaffected.
_REMOTE_CODE_SCRIPT = textwrap.dedent("""\
    import sys

    try:
        import modeling_vltp
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("modeling_vltp is importable: the test would not test remote code")

    import torch
    from transformers import AutoModel, AutoProcessor

    workdir, sources = sys.argv[1], sys.argv[2:]
    calls, (image, task) = torch.load(f"{workdir}/inputs.pt")
    results = {}
    for source in sources:
        model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            results[source] = [dict(model(**kwargs)) for kwargs in calls]
    processor = AutoProcessor.from_pretrained(sources[-1], trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
    results["processor"] = dict(processor(image.numpy(), task))
    torch.save(results, f"{workdir}/outputs.pt")
""")


def run_remote_code(tmp_path: Path, model, processor, sources: list[str], calls: list[dict]):
    """Load each of `sources` with `trust_remote_code=True` in a fresh process where `modeling_vltp` cannot be
    imported, run it on each of `calls` (keyword arguments), run the last source's processor on an image and a task,
    and check that every output matches `model`'s and `processor`'s here: integers exactly, floats to
    FLOAT32_TOLERANCE, since another process may lay memory out differently and MKL then rounds differently (6e-8
    seen on an AMD EPYC)."""
    image, task = torch.arange(24 * 32 * 3, dtype=torch.uint8).reshape(24, 32, 3), "open the bottle of beer"
    torch.save((calls, (image, task)), tmp_path / "inputs.pt")
    run_without_package(_REMOTE_CODE_SCRIPT, str(tmp_path), *sources, cwd=tmp_path)
    results = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = [dict(model(**kwargs)) for kwargs in calls]
    for source in sources:
        assert_equal_nested(results[source], expected, FLOAT32_TOLERANCE)
    assert_equal_nested(results["processor"], dict(processor(image.numpy(), task)), FLOAT32_TOLERANCE)


def assert_equal_nested(actual, expected, tolerance: float = 0.0):
    """Equality of tensors in (nested) lists, tuples and dicts: integer tensors exactly, floating ones within
    `tolerance` relative to their largest value (0: bit for bit)."""
    if isinstance(expected, torch.Tensor):
        if expected.is_floating_point() and tolerance:
            assert_close(actual, expected, tolerance)
        else:
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_equal_nested(actual[key], expected[key], tolerance)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_equal_nested(a, e, tolerance)
    else:
        assert actual == expected


def share_the_plain_way(model, processor, local_dir: Path, repo_id: str):
    """What every transformers user does: `save_pretrained` into a folder and `push_to_hub`, nothing else."""
    model.save_pretrained(local_dir)
    processor.save_pretrained(local_dir)
    model.push_to_hub(repo_id)
    processor.push_to_hub(repo_id)


def test_remote_code_without_the_package_from_a_folder_and_from_the_hub(tmp_path, hub):
    model, processor = tiny_model(), tiny_processor(sam_image_size=160)
    share_the_plain_way(model, processor, tmp_path / "local", REPO_ID)
    assert json.loads((tmp_path / "local" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_vltp.VLTPVisionConfig",
        "AutoModel": "modeling_vltp.VLTPSamVisionModel",
    }
    pixel_values, guidance = model_inputs()
    calls = [{"pixel_values": pixel_values}, {"pixel_values": pixel_values, "guidance_embeds": guidance}]
    run_remote_code(tmp_path, model, processor, [str(tmp_path / "local"), REPO_ID], calls)


def test_remote_code_of_the_full_model_and_processor(tmp_path, hub):
    model, processor = tiny_model_and_processor()
    share_the_plain_way(model, processor, tmp_path / "local", FULL_REPO_ID)
    config = json.loads(Path(HfApi().hf_hub_download(FULL_REPO_ID, "config.json")).read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vltp.VLTPConfig",
        "AutoModel": "modeling_vltp.VLTPForTaskSegmentation",
    }
    processor_config = json.loads(Path(HfApi().hf_hub_download(FULL_REPO_ID, "processor_config.json")).read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_vltp.VLTPProcessor"}
    image = np.arange(40 * 56 * 3, dtype=np.uint8).reshape(40, 56, 3)
    batch = processor([image, image[::-1].copy()], ["open the bottle of beer", "cut the food"], answers="Sure, [SEG].")
    calls = [{key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "sam_pixel_values")}]
    run_remote_code(tmp_path, model, processor, [str(tmp_path / "local"), FULL_REPO_ID], calls)


def test_save_without_remote_code_writes_no_auto_map_and_no_code(tmp_path):
    model, processor = tiny_model_and_processor()
    model.save_pretrained(tmp_path / "with")  # an auto_map in memory too, from this save
    processor.save_pretrained(tmp_path / "with")
    model.save_pretrained(tmp_path / "plain", remote_code=False)
    processor.save_pretrained(tmp_path / "plain", remote_code=False)
    files = sorted(path.name for path in (tmp_path / "plain").iterdir())
    assert files == [
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert "auto_map" not in (tmp_path / "plain" / "config.json").read_text()
    assert "auto_map" not in (tmp_path / "plain" / "processor_config.json").read_text()
    assert "auto_map" not in (tmp_path / "plain" / "tokenizer_config.json").read_text()
    # The classes stay registered: the next plain save writes the code again.
    model.save_pretrained(tmp_path / "again")
    assert {"configuration_vltp.py", "modeling_vltp.py"} <= {path.name for path in (tmp_path / "again").iterdir()}
    reloaded = VLTPForTaskSegmentation.from_pretrained(tmp_path / "plain")
    assert reloaded.state_dict().keys() == model.state_dict().keys()


# -- LoRA adapters on the Hub ---------------------------------------------------------------------------------------


def test_push_adapter_with_card_then_pull_and_merge(tmp_path, hub):
    from peft import PeftModel
    from test_conversion_vltp import lora_model, task_batch, task_outputs

    model, processor = tiny_model_and_processor()
    push_to_hub_with_card(model, FULL_REPO_ID)
    adapter = lora_model(model)
    adapted = task_outputs(adapter, task_batch(processor))
    push_to_hub_with_card(adapter, ADAPTER_REPO_ID, base_model=FULL_REPO_ID)

    api = HfApi()
    files = set(api.list_repo_files(ADAPTER_REPO_ID)) - {".gitattributes"}
    assert files == {"README.md", "adapter_config.json", "adapter_model.safetensors"}  # no base weights
    card = ModelCard(Path(api.hf_hub_download(ADAPTER_REPO_ID, "README.md")).read_text())
    assert card.data.library_name == "peft" and card.data.base_model == FULL_REPO_ID
    assert "| rank r | 4 |" in card.text and f'PeftModel.from_pretrained(base, "{ADAPTER_REPO_ID}")' in card.text

    base = VLTPForTaskSegmentation.from_pretrained(FULL_REPO_ID).eval()
    pulled = PeftModel.from_pretrained(base, ADAPTER_REPO_ID).eval()
    assert_equal_nested(task_outputs(pulled, task_batch(processor)), adapted)
    merged = pulled.merge_and_unload()
    assert type(merged) is VLTPForTaskSegmentation
    # Merging adds B @ A into the weights: W x + B (A x) becomes (W + B A) x, float32 rounding apart.
    assert_equal_nested(task_outputs(merged, task_batch(processor)), adapted, FLOAT32_TOLERANCE)


# -- pulls from olah ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pinned",
    [
        True,
        pytest.param(
            False,
            marks=pytest.mark.xfail(
                version.parse(transformers.__version__) < version.parse("5.24"),
                reason="olah answers 401, not 404, for a file missing at a branch name (404 at a commit sha); "
                "transformers before 5.24 probes adapter_config.json at 'main' and takes the 401 for a missing "
                "repository",
            ),
        ),
    ],
    ids=["at-commit", "at-main"],
)
def test_pull_from_olah_reproduces_outputs(tmp_path, olah, pinned):
    model = tiny_model()
    model.save_pretrained(tmp_path / "checkpoint")
    commit = olah.add_git_repo(REPO_ID, tmp_path / "checkpoint")

    if pinned:  # transformers 5.17 probes for a PEFT adapter_config.json at `adapter_kwargs`' revision, not `revision`
        loaded = VLTPSamVisionModel.from_pretrained(REPO_ID, revision=commit, adapter_kwargs={"revision": commit})
    else:
        loaded = VLTPSamVisionModel.from_pretrained(REPO_ID)
    pixel_values, guidance = model_inputs()
    assert_same_outputs(outputs_of(loaded.eval(), pixel_values, guidance), outputs_of(model, pixel_values, guidance))
    snapshot = Path(constants.HF_HUB_CACHE, "models--testorg--vltp-tiny", "snapshots", commit)
    assert (snapshot / "model.safetensors").is_file()  # it came over HTTP from olah, into our empty cache
