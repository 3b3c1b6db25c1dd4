"""convert_vltp (transformers' LLaVA + SAM) and convert_lisa (LISA's checkpoints) to VLTPForTaskSegmentation, checked
against the source implementations; sharded saving; LoRA adapters through peft."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_conversion import (
    META_SAM_STD,
    assert_close,
    leftovers,
    randomize,
    tiny_sam_config,
    with_layer_norm_eps,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SamModel,
)

from modeling_vltp import VLTPConfig, VLTPForTaskSegmentation, VLTPProcessor, VLTPSamVisionModel
from modeling_vltp.conversion import (
    LISA_SYSTEM_PROMPT,
    build_check_inputs,
    build_segment_anything,
    check_image,
    convert_lisa,
    convert_sam,
    convert_vltp,
    hf_sam_outputs,
    relative_error,
    segment_anything_outputs,
)
from modeling_vltp.modeling_vltp import MAX_SHARD_SIZE
from modeling_vltp.testing import tiny_llava_config, tiny_model_and_processor

REPO_ROOT = Path(__file__).resolve().parents[1]
TIED_KEY = "prompt_encoder.shared_embedding.positional_embedding"  # saved once, as shared_image_embedding
SAM_PARTS = ("shared_image_embedding.", "prompt_encoder.", "mask_decoder.")
WORDS = "you can use the thing to open bottle of beer please output segmentation mask sure it is a".split()


def word_tokenizer(added_special: list[str], added: list[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that starts every text with `<s>`, like LLaMA's, with extra tokens added in order."""
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *WORDS, ".", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_tokens(list(added))
    tokenizer.add_tokens(list(added_special), special_tokens=True)
    return tokenizer


@pytest.fixture
def llava_checkpoint(tmp_path, request) -> tuple[Path, LlavaForConditionalGeneration]:
    """A tiny checkpoint in `llava-hf/llava-1.5-7b-hf`'s layout: LLaVA with `<image>` and `<pad>` added to the
    tokenizer; the embedding matrix padded to a multiple of 64 rows as llava-hf's is (`[SEG]` then fits), or exactly
    the tokenizer's size (adding `[SEG]` then grows it)."""
    padded = getattr(request, "param", True)
    tokenizer = word_tokenizer(["<image>", "<pad>"])
    tokenizer.pad_token = "<pad>"
    vocab_size = 64 if padded else len(tokenizer)
    config = tiny_llava_config(vocab_size, tokenizer.convert_tokens_to_ids("<image>"))
    folder = tmp_path / "llava-hf"
    randomize(LlavaForConditionalGeneration(config)).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8).save_pretrained(folder)
    # randomize() also draws the rotary frequencies, which are not saved: the source is what the folder holds.
    return folder, LlavaForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture
def sam_checkpoint(tmp_path) -> tuple[Path, SamModel]:
    sam = randomize(SamModel(tiny_sam_config()), seed=1)
    sam.tie_weights()
    sam.save_pretrained(tmp_path / "sam-hf")
    return tmp_path / "sam-hf", sam


def llava_logits(llava, processor: VLTPProcessor) -> tuple[dict, torch.Tensor]:
    inputs = processor(check_image(), "open the bottle of beer")
    inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        return inputs, llava(**inputs).logits


# -- convert_vltp ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("llava_checkpoint", [True, False], ids=["spare-rows", "grows"], indirect=True)
def test_convert_vltp_from_llava_and_hf_sam(tmp_path, llava_checkpoint, sam_checkpoint):
    (llava_dir, source_llava), (sam_dir, source_sam) = llava_checkpoint, sam_checkpoint
    output_dir = convert_vltp(llava_dir, sam_dir, tmp_path / "out", prune_layers=[2], prune_rates=[0.25])
    assert leftovers(tmp_path) == []

    model = VLTPForTaskSegmentation.from_pretrained(output_dir).eval()
    processor = VLTPProcessor.from_pretrained(output_dir)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vltp.VLTPConfig",
        "AutoModel": "modeling_vltp.VLTPForTaskSegmentation",
    }
    assert {"configuration_vltp.py", "modeling_vltp.py", "processing_vltp.py"} <= {
        p.name for p in output_dir.iterdir()
    }

    # [SEG] is a new token of the tokenizer, and the model's config knows its id.
    source_tokenizer_size = len(LlavaProcessor.from_pretrained(llava_dir).tokenizer)
    assert processor.seg_token_id == source_tokenizer_size == model.config.seg_token_id
    assert processor.tokenizer.decode([processor.seg_token_id]) == "[SEG]"
    num_embeddings = model.get_input_embeddings().num_embeddings
    assert num_embeddings == max(source_llava.config.text_config.vocab_size, len(processor.tokenizer))
    assert processor.num_image_tokens == 16 and model.config.projector == "mlp"
    assert model.config.vision_config.prune_layers == [2] and model.config.vision_config.guidance_dim == 16

    # LLaVA: the source's logits (over the source vocabulary), with the prompt the processor builds. The same layers,
    # but a grown lm_head is another matrix shape: float32 rounding apart (FLOAT32_TOLERANCE).
    inputs, expected = llava_logits(source_llava, processor)
    with torch.no_grad():
        logits = model.llava(**inputs).logits
    assert_close(logits[..., : expected.shape[-1]], expected)

    # SAM: the image encoder without guidance and the mask decoder for one point, as transformers' SamModel (VLTP's
    # encoder is another code path: float32 rounding apart).
    pixel_values, point = build_check_inputs(source_sam.config)
    expected_embeddings, expected_masks, expected_iou = hf_sam_outputs(source_sam, pixel_values, point)
    with torch.no_grad():
        assert_close(model.vision_model(pixel_values).last_hidden_state, expected_embeddings)
    decoder = SamModel(source_sam.config).eval()
    decoder.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(SAM_PARTS)}, strict=False)
    _, masks, iou = hf_sam_outputs(decoder, pixel_values, point, image_embeddings=expected_embeddings)
    assert_close(masks, expected_masks)
    assert_close(iou, expected_iou)

    # The whole system runs: one [SEG] in the answer guides the pruning and prompts the mask decoder.
    batch = processor(check_image(), "open the bottle of beer", answers="Sure, [SEG].")
    with torch.no_grad():
        outputs = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "sam_pixel_values")})
    assert outputs.pred_masks.shape == (1, 16, 16) and outputs.keep_indices[0].shape == (1, 12)


# -- convert_lisa ---------------------------------------------------------------------------------------------------


def randomize_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random values for the saved weights only, LayerNorms included (the rotary frequencies of LLaMA are computed,
    not saved)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    return module.eval()


class TinyLisa:
    """A LISA checkpoint built from independent source models, so the conversion can be checked against each: LLaMA
    (transformers' LlamaForCausalLM, whose names LISA's LLaMA weights have), CLIP (CLIPVisionModel, in its own folder
    as LISA's merge script drops the vision tower), Meta's SAM (segment_anything) and LISA's Linear modules."""

    def __init__(self, folder: Path, segment_anything):
        self.tokenizer = word_tokenizer(["<im_start>", "<im_end>"], added=["[SEG]"])  # LISA's order: 32000-32002
        self.tokenizer.pad_token = self.tokenizer.unk_token
        llama_fields = dict(
            vocab_size=len(self.tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            hidden_act="silu",
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
        self.llama = randomize_weights(LlamaForCausalLM(LlamaConfig(**llama_fields)), seed=1)
        self.clip = randomize_weights(
            CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=3,
                    num_attention_heads=2,
                    image_size=32,
                    patch_size=8,
                )
            ),
            seed=2,
        )
        # Seed 0: with these weights transformers' default LayerNorm eps would miss Meta's masks by 4e-5.
        self.sam = randomize_weights(build_segment_anything(segment_anything, tiny_sam_config()), std=META_SAM_STD)
        self.projector = randomize_weights(torch.nn.Linear(32, 64), seed=4)
        self.text_hidden_fcs = randomize_weights(
            torch.nn.Sequential(
                torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16), torch.nn.Dropout(0.0)
            ),
            seed=5,
        )
        self.folder, self.clip_dir = folder / "lisa", folder / "clip"
        self.clip.save_pretrained(self.clip_dir)
        self.weights = {
            **self.llama.state_dict(),
            **{f"model.mm_projector.{k}": v for k, v in self.projector.state_dict().items()},
            **{f"model.visual_model.{k}": v for k, v in self.sam.state_dict().items()},
            **{f"model.text_hidden_fcs.0.{k}": v for k, v in self.text_hidden_fcs.state_dict().items()},
        }
        self.config = {
            "architectures": ["LISAForCausalLM"],
            "model_type": "llava",
            "mm_vision_tower": str(self.clip_dir),
            "mm_hidden_size": 32,
            "mm_vision_select_layer": -2,
            "mm_use_im_start_end": True,
            "use_mm_proj": True,
            "out_dim": 16,
            "train_mask_decoder": True,
            "torch_dtype": "float32",
            **llama_fields,
        }
        self.write()

    def write(self, weights: dict | None = None):
        """LISA's files: config.json, the tokenizer, the weights as two pytorch_model-*.bin shards with an index."""
        weights = self.weights if weights is None else weights
        self.folder.mkdir(exist_ok=True)
        for old in self.folder.glob("pytorch_model*"):
            old.unlink()
        (self.folder / "config.json").write_text(json.dumps(self.config))
        self.tokenizer.save_pretrained(self.folder)
        keys = sorted(weights)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, shard_keys in shards.items():
            torch.save({key: weights[key].contiguous() for key in shard_keys}, self.folder / name)
        weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
        (self.folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture
def lisa(tmp_path, segment_anything) -> TinyLisa:
    return TinyLisa(tmp_path, segment_anything)


def test_convert_lisa_matches_llama_clip_and_segment_anything(tmp_path, lisa):
    output_dir = convert_lisa(lisa.folder, tmp_path / "out", sam_variant=tiny_sam_config(), prune_layers=[2])
    assert leftovers(tmp_path) == []
    model = VLTPForTaskSegmentation.from_pretrained(output_dir).eval()
    processor = VLTPProcessor.from_pretrained(output_dir)
    config = model.config
    assert config.projector == "linear" and config.seg_hidden_state == "before_seg"
    assert config.seg_token_id == lisa.tokenizer.convert_tokens_to_ids("[SEG]") == processor.seg_token_id
    assert config.llava_config.vision_feature_layer == -2 and processor.num_image_tokens == 16
    assert not hasattr(model.llava.model.multi_modal_projector, "linear_2")

    # LISA's prompt: LLaVA-v1's system sentence, the image between <im_start> and <im_end>.
    inputs = processor(check_image(), "open the bottle of beer")
    ids = inputs["input_ids"][0].tolist()
    start, end = (lisa.tokenizer.convert_tokens_to_ids(token) for token in ("<im_start>", "<im_end>"))
    image = processor.image_token_id
    assert ids[ids.index(start) : ids.index(end) + 1] == [start] + [image] * 16 + [end]
    assert processor.build_prompt("x").startswith(LISA_SYSTEM_PROMPT + " USER: <im_start><image><im_end>\n")

    with torch.no_grad():
        # LLaMA: text alone gives LlamaForCausalLM's logits (over LISA's vocabulary; <image> is a new row, so lm_head
        # has another shape: float32 rounding apart).
        text_ids = torch.tensor([[1, 5, 6, 7, 8, 9, len(lisa.tokenizer) - 3]])
        assert_close(model.llava(input_ids=text_ids).logits[..., : len(lisa.tokenizer)], lisa.llama(text_ids).logits)
        # With the image: CLIP's second-to-last layer without CLS, through LISA's Linear, in place of the image tokens.
        features = lisa.projector(
            lisa.clip(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        )
        is_image = inputs["input_ids"] == image
        embeds = lisa.llama.get_input_embeddings()(inputs["input_ids"].masked_fill(is_image, 0))
        embeds[is_image] = features.reshape(-1, 64)
        expected = lisa.llama(inputs_embeds=embeds).logits
        logits = model.llava(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        ).logits
        assert_close(logits[..., : len(lisa.tokenizer)], expected)
        # text_hidden_fcs: LISA's Linear-ReLU-Linear, the same kernels on the same inputs here: bit for bit.
        hidden = torch.randn(3, 64)
        torch.testing.assert_close(model.text_hidden_fcs(hidden), lisa.text_hidden_fcs(hidden), rtol=0, atol=0)

    # SAM: Meta's segment_anything. Its image encoder agrees in float64 to rounding; its prompt encoder only runs in
    # float32, where Meta's attention code rounds differently from transformers' (4e-7 here, a few float32 ulps
    # through two layers; 1e-5 is the conversion's own check). Meta's two-way transformer has nn.LayerNorm's eps.
    assert config.mask_decoder_config.layer_norm_eps == 1e-5 and config.vision_config.layer_norm_eps == 1e-6
    pixel_values, point = build_check_inputs(tiny_sam_config())
    expected_embeddings, expected_masks, expected_iou = segment_anything_outputs(lisa.sam, pixel_values, point)
    with torch.no_grad():
        embeddings = model.double().vision_model(pixel_values.double()).last_hidden_state
        reference = lisa.sam.double().image_encoder(pixel_values.double())
    assert relative_error(embeddings, reference) < 1e-12
    decoder_config = tiny_sam_config()
    decoder_config.mask_decoder_config = config.mask_decoder_config
    decoder = SamModel(decoder_config).eval()
    decoder.load_state_dict(
        {k: v for k, v in model.float().state_dict().items() if k.startswith(SAM_PARTS)}, strict=False
    )
    _, masks, iou = hf_sam_outputs(decoder, pixel_values, point, image_embeddings=expected_embeddings)
    assert relative_error(masks, expected_masks) <= 1e-5 and relative_error(iou, expected_iou) <= 1e-5
    # A wrong eps misses by more than that, as transformers' default 1e-6 shows with these weights.
    _, wrong_eps_masks, _ = hf_sam_outputs(
        with_layer_norm_eps(decoder, 1e-6), pixel_values, point, image_embeddings=expected_embeddings
    )
    assert relative_error(wrong_eps_masks, expected_masks) > 1e-5


# -- convert_sam's output as the SAM side, and the command lines ----------------------------------------------------


def test_convert_vltp_keeps_the_prune_decoder_of_convert_sams_output(tmp_path, llava_checkpoint, sam_checkpoint):
    sam_dir, _ = sam_checkpoint
    vltp_sam = convert_sam(sam_dir, tmp_path / "vltp-sam", prune_layers=[1, 3], prune_rates=[0.5, 0.25])
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "hub" / "convert_vltp.py"),
            "--llava",
            str(llava_checkpoint[0]),
            "--sam",
            str(vltp_sam),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    model = VLTPForTaskSegmentation.from_pretrained(tmp_path / "out")
    source = VLTPSamVisionModel.from_pretrained(vltp_sam)
    assert model.config.vision_config.prune_layers == [1, 3] and model.config.vision_config.prune_rates == [0.5, 0.25]
    for key, value in source.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[key], value), key


def test_convert_lisa_in_bfloat16(tmp_path, lisa):
    # The self-check compares LISA's own computation within bfloat16 rounding, and SAM in float32.
    output_dir = convert_lisa(lisa.folder, tmp_path / "out", sam_variant=tiny_sam_config(), dtype=torch.bfloat16)
    with safe_open(output_dir / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"BF16"}


def test_convert_lisa_reads_a_vision_tower_inside_the_checkpoint(tmp_path, lisa):
    # LISA checkpoints that kept the vision tower hold it in LLaVA-v1's CLIPVisionTower:
    # model.vision_tower.vision_tower.
    lisa.weights.update({f"model.vision_tower.vision_tower.{k}": v for k, v in lisa.clip.state_dict().items()})
    lisa.write()
    output_dir = convert_lisa(lisa.folder, tmp_path / "out", sam_variant=tiny_sam_config())
    model = VLTPForTaskSegmentation.from_pretrained(output_dir)
    for key, value in lisa.clip.state_dict().items():
        assert torch.equal(model.llava.model.vision_tower.state_dict()[key], value), key


def test_convert_lisa_cli_reports_a_wrong_sam_variant_in_one_line(tmp_path, lisa):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "hub" / "convert_lisa.py"),
            "--input",
            str(lisa.folder),
            "--output-dir",
            str(tmp_path / "out"),
            "--sam-variant",
            "vit_b",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {lisa.folder} (model.visual_model.*) does not match SAM vit_b: image_encoder.blocks.0.attn.proj.bias "
        "has shape (32,), expected (768,) (201 weights differ). Wrong variant?"
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# -- refusals: a clear error and no output --------------------------------------------------------------------------


def assert_refused(tmp_path, convert, error, match):
    with pytest.raises(error, match=match):
        convert(tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_convert_vltp_refuses_swapped_truncated_and_mismatched_inputs(tmp_path, llava_checkpoint, sam_checkpoint):
    (llava_dir, _), (sam_dir, _) = llava_checkpoint, sam_checkpoint
    assert_refused(
        tmp_path,
        lambda out: convert_vltp(sam_dir, llava_dir, out),
        ValueError,
        r"sam-hf is not a LLaVA checkpoint: its config.json has model_type 'sam', expected 'llava'",
    )
    assert_refused(
        tmp_path,
        lambda out: convert_vltp(llava_dir, llava_dir, out),
        ValueError,
        r"llava-hf is not a transformers SAM checkpoint: .* model_type 'llava', expected 'sam'",
    )
    assert_refused(
        tmp_path,
        lambda out: convert_vltp(tmp_path / "nothing", sam_dir, out),
        FileNotFoundError,
        r"No LLaVA checkpoint at .*nothing \(no config.json\)",
    )
    # transformers saves LLaVA with llava-hf's names (language_model.model.*, multi_modal_projector.*); errors use the
    # names of the loaded model.
    weights = load_file(llava_dir / "model.safetensors")
    weights["multi_modal_projector.linear_2.weight"] = torch.zeros(64, 32)
    del weights["language_model.model.norm.weight"]
    save_file(weights, llava_dir / "model.safetensors", metadata={"format": "pt"})
    assert_refused(
        tmp_path,
        lambda out: convert_vltp(llava_dir, sam_dir, out),
        ValueError,
        r"llava-hf does not match LLaVA: model.multi_modal_projector.linear_2.weight has shape \(64, 32\), expected "
        r"\(64, 64\)",
    )
    del weights["multi_modal_projector.linear_2.weight"]
    save_file(weights, llava_dir / "model.safetensors", metadata={"format": "pt"})
    assert_refused(
        tmp_path,
        lambda out: convert_vltp(llava_dir, sam_dir, out),
        ValueError,
        r"llava-hf lacks 2 weights of LLaVA: model.language_model.norm.weight, "
        r"model.multi_modal_projector.linear_2.weight\. Truncated checkpoint\?",
    )


def test_convert_vltp_refuses_a_tokenizer_of_another_model(tmp_path, llava_checkpoint, sam_checkpoint):
    (llava_dir, _), (sam_dir, _) = llava_checkpoint, sam_checkpoint
    config = json.loads((llava_dir / "config.json").read_text())
    config["image_token_id"] = 5
    (llava_dir / "config.json").write_text(json.dumps(config))
    assert_refused(
        tmp_path,
        lambda out: convert_vltp(llava_dir, sam_dir, out),
        ValueError,
        r"the tokenizer's <image> has id \d+ but the model's image_token_id is 5",
    )


def test_convert_lisa_refuses_incomplete_and_foreign_checkpoints(tmp_path, lisa, llava_checkpoint):
    convert = lambda out: convert_lisa(lisa.folder, out, sam_variant=tiny_sam_config())  # noqa: E731
    weights = dict(lisa.weights)
    del weights["model.text_hidden_fcs.0.2.bias"]
    lisa.write(weights)
    assert_refused(tmp_path, convert, ValueError, r"lisa lacks 1 weights of LISA: text_hidden_fcs.2.bias")
    lisa.write({**lisa.weights, "model.mm_projector.weight": torch.zeros(64, 48)})
    assert_refused(
        tmp_path,
        convert,
        ValueError,
        r"lisa does not match LISA: model.mm_projector.weight has shape \(64, 48\), expected \(64, 32\)",
    )
    lisa.write({k: v for k, v in lisa.weights.items() if k != "model.visual_model.mask_decoder.iou_token.weight"})
    assert_refused(
        tmp_path,
        convert,
        ValueError,
        r"lisa \(model.visual_model.\*\) lacks 1 weights of SAM .*: mask_decoder.iou_token.weight",
    )
    assert_refused(
        tmp_path,
        lambda out: convert_lisa(llava_checkpoint[0], out),
        ValueError,
        r"llava-hf is not a LISA checkpoint: .* For transformers' LLaVA \(llava-hf\) use convert_vltp",
    )
    assert_refused(
        tmp_path,
        lambda out: convert_vltp(lisa.folder, llava_checkpoint[0], out),
        ValueError,
        r"lisa is in LLaVA-v1's own layout .* convert LISA checkpoints with convert_lisa",
    )


# -- saving: safetensors shards -------------------------------------------------------------------------------------


def task_batch(processor: VLTPProcessor) -> dict:
    image = check_image()
    batch = processor([image, image[::-1].copy()], ["open the bottle of beer", "cut the food"], answers="Sure, [SEG].")
    return {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "sam_pixel_values")}


def task_outputs(model, batch: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outputs = model(**batch)
    return {key: outputs[key] for key in ("logits", "seg_embeds", "pred_masks", "iou_scores")}


def test_save_pretrained_in_shards_reloads_identically(tmp_path):
    model, processor = tiny_model_and_processor()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    files = sorted(path.name for path in (tmp_path / "sharded").iterdir())
    shards = [name for name in files if name.startswith("model-") and name.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only
    weight_map = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)

    reloaded = VLTPForTaskSegmentation.from_pretrained(tmp_path / "sharded").eval()
    expected = model.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    batch = task_batch(processor)
    for key, value in task_outputs(reloaded, batch).items():
        torch.testing.assert_close(value, task_outputs(model, batch)[key], rtol=0, atol=0)


def test_the_7b_preset_is_written_in_several_shards():
    with torch.device("meta"):  # sizes only: nothing is allocated
        state_dict = VLTPForTaskSegmentation(VLTPConfig.llava15_7b_sam_vit_h()).state_dict()
    num_parameters = sum(value.numel() for key, value in state_dict.items() if key != TIED_KEY)
    assert 7.6e9 < num_parameters < 7.8e9  # LLaVA-1.5-7B (7.06B) + SAM ViT-H with the prune decoder
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=MAX_SHARD_SIZE)
    assert split.is_sharded and len(split.filename_to_tensors) == 7  # 30.9 GB in float32, at most 5 GB per file
    # transformers 5's own default (50GB) would write one 31 GB file; VLTP models default to MAX_SHARD_SIZE.
    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert not split_torch_state_dict_into_shards(state_dict, max_shard_size=default).is_sharded
    ours = inspect.signature(VLTPForTaskSegmentation.save_pretrained).parameters["max_shard_size"].default
    assert ours == MAX_SHARD_SIZE


# -- LoRA adapters through peft -------------------------------------------------------------------------------------


def lora_model(model: VLTPForTaskSegmentation):
    """LoRA on the language model's q_proj and v_proj (LISA's targets), with random weights so that it changes the
    outputs (peft starts B at zero)."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    return get_peft_model(model, config).eval()


def test_lora_adapter_saves_alone_loads_onto_a_base_and_merges(tmp_path):
    model, processor = tiny_model_and_processor()
    model.save_pretrained(tmp_path / "base")
    batch = task_batch(processor)
    base_outputs = task_outputs(model, batch)
    adapter = lora_model(model)
    adapted = task_outputs(adapter, batch)
    assert not torch.allclose(adapted["logits"], base_outputs["logits"])

    adapter.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in key and "language_model" in key for key in saved)  # no base weights
    assert {key.rsplit(".", 3)[-3] for key in saved} == {"q_proj", "v_proj"}

    base = VLTPForTaskSegmentation.from_pretrained(tmp_path / "base").eval()
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    for key, value in task_outputs(loaded, batch).items():
        torch.testing.assert_close(value, adapted[key], rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    assert type(merged) is VLTPForTaskSegmentation
    assert not any("lora_" in key for key in merged.state_dict())
    # Merging adds B @ A into the weights: W x + B (A x) becomes (W + B A) x, float32 rounding apart.
    for key, value in task_outputs(merged, batch).items():
        assert_close(value, adapted[key])
