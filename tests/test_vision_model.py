"""VLTPSamVisionModel: exactness against transformers' SAM, the pruned path against a slow masked reference, training,
loading and the bad inputs of its forward."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, SamConfig, SamModel, SamVisionModel

from modeling_vltp import (
    VLTPSamVisionModel,
    VLTPVisionConfig,
    count_gmacs,
    pruning_targets,
    vltp_pruning_loss,
)

GUIDANCE_DIM = 24


def tiny_vision_config(**overrides) -> VLTPVisionConfig:
    """A 10x10-token ViT with 4x4 windows (so the window grid is padded to 12x12, as SAM pads 64 to 70)."""
    fields = dict(
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=2,
        image_size=160,
        patch_size=16,
        window_size=4,
        global_attn_indexes=[1, 3, 5],
        output_channels=16,
        num_pos_feats=8,
        mlp_dim=64,
        prune_layers=[2, 4],
        prune_rates=[0.5, 0.7],
        guidance_dim=GUIDANCE_DIM,
        prune_decoder_hidden_size=16,
        prune_decoder_num_attention_heads=2,
        prune_decoder_mlp_dim=32,
    )
    fields.update(overrides)
    return VLTPVisionConfig(**fields)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (SAM's zero-initialised relative positions and absolute positions included) random values,
    so that comparisons exercise all of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def tiny_model(seed: int = 0, **overrides) -> VLTPSamVisionModel:
    return randomized(VLTPSamVisionModel(tiny_vision_config(**overrides)), seed)


def sam_with_same_weights(model: VLTPSamVisionModel, attn_implementation: str = "sdpa") -> SamVisionModel:
    sam = SamVisionModel._from_config(SamVisionConfig_from(model.config), attn_implementation=attn_implementation)
    encoder_weights = {k: v for k, v in model.state_dict().items() if k.startswith("vision_encoder.")}
    sam.load_state_dict(encoder_weights, strict=True)
    return sam.eval()


def SamVisionConfig_from(config: VLTPVisionConfig):
    from transformers import SamVisionConfig

    sam_fields = {k: v for k, v in config.to_dict().items() if k in SamVisionConfig.__dataclass_fields__}
    return SamVisionConfig(**sam_fields)


def inputs(batch_size: int = 2, seed: int = 1, image_size: int = 160):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    guidance = torch.randn(batch_size, GUIDANCE_DIM, generator=generator)
    return pixel_values, guidance


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# --- the slow masked reference: full grid, pruned tokens neither queries nor keys, and left unchanged ---------------


def reference_attention(attn, tokens: torch.Tensor, is_key: torch.Tensor) -> torch.Tensor:
    """Eager SAM attention over (b, h, w, C) `tokens` whose keys are limited to `is_key` (b, h * w)."""
    b, h, w, channels = tokens.shape
    heads = attn.num_attention_heads
    qkv = attn.qkv(tokens).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv[0], qkv[1], qkv[2]
    logits = (query * attn.scale) @ key.transpose(-2, -1)
    rel = attn.get_decomposed_rel_pos(
        query.reshape(b * heads, h * w, -1), attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w)
    )
    logits = logits + rel.reshape(b, heads, h * w, h * w)
    logits = logits.masked_fill(~is_key[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)  # rows of pruned queries with no key are discarded anyway
    out = (probs @ value).transpose(1, 2).reshape(b, h, w, channels)
    return attn.proj(out)


def reference_layer(layer, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One SAM layer on the full grid where only `keep` (B, H, W) tokens are queries and keys and get updated."""
    batch_size, height, width, channels = x.shape
    normed = layer.layer_norm1(x)
    window = layer.window_size
    if window > 0:
        pad = (window - height % window) % window
        normed = F.pad(normed, (0, 0, 0, pad, 0, pad))
        is_key = F.pad(keep, (0, pad, 0, pad), value=True)  # SAM's padding places are keys
        side, n = height + pad, (height + pad) // window
        windows = normed.view(batch_size, n, window, n, window, channels).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(-1, window, window, channels)
        is_key = is_key.view(batch_size, n, window, n, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        out = reference_attention(layer.attn, windows, is_key)
        out = out.view(batch_size, n, n, window, window, channels).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch_size, side, side, channels)[:, :height, :width]
    else:
        out = reference_attention(layer.attn, normed, keep.reshape(batch_size, -1))
    updated = x + out
    updated = updated + layer.mlp(layer.layer_norm2(updated))
    return torch.where(keep[..., None], updated, x)


def reference_forward(model: VLTPSamVisionModel, pixel_values, guidance, rates):
    encoder = model.vision_encoder
    x = encoder.patch_embed(pixel_values) + encoder.pos_embed
    batch_size, height, width, _ = x.shape
    num_tokens = height * width
    bounds = [0, *model.config.prune_layers, model.config.num_hidden_layers]
    keeps, scores_per_stage = [], []
    for layer in encoder.layers[: bounds[1]]:
        x = layer(x)
    for rate, start, end in zip(rates, bounds[1:-1], bounds[2:]):
        scores = model.prune_decoder(x, guidance)
        num_keep = num_tokens - round(rate * num_tokens)
        threshold = scores.sort(dim=-1, descending=True).values[:, num_keep - 1 : num_keep]
        keep = scores >= threshold
        keeps.append(keep)
        scores_per_stage.append(scores)
        for layer in encoder.layers[start:end]:
            x = reference_layer(layer, x, keep.view(batch_size, height, width))
    return encoder.neck(x), scores_per_stage, keeps


# --- exactness against transformers' SAM -------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_without_guidance_equals_sam(attn_implementation):
    model = tiny_model()
    model.set_attn_implementation(attn_implementation)
    sam = sam_with_same_weights(model, attn_implementation)
    pixel_values, _ = inputs()
    with torch.no_grad():
        expected = sam(pixel_values, output_hidden_states=True)
        actual = model(pixel_values, output_hidden_states=True)
    assert actual.token_scores is None and actual.keep_indices is None
    assert relative_error(actual.last_hidden_state, expected.last_hidden_state) <= 1e-5
    assert len(actual.hidden_states) == len(expected.hidden_states) == 7
    for mine, theirs in zip(actual.hidden_states, expected.hidden_states):
        assert relative_error(mine, theirs) <= 1e-5


def test_rate_zero_equals_sam_and_keeps_every_token():
    model = tiny_model()
    sam = sam_with_same_weights(model)
    pixel_values, guidance = inputs()
    with torch.no_grad():
        expected = sam(pixel_values).last_hidden_state
        actual = model(pixel_values, guidance_embeds=guidance, prune_rates=[0.0, 0.0])
    assert relative_error(actual.last_hidden_state, expected) <= 1e-5
    assert len(actual.token_scores) == 2 and actual.token_scores[0].shape == (2, 100)
    for kept in actual.keep_indices:
        assert torch.equal(kept, torch.arange(100).expand(2, -1))


def test_packed_layers_with_every_token_kept_equal_sam_layers():
    """The packed gather/compute/scatter path itself (SAM's padding keys included) reproduces SAM's layers."""
    model = tiny_model()
    pixel_values, _ = inputs()
    encoder = model.vision_encoder
    with torch.no_grad():
        x = encoder.patch_embed(pixel_values) + encoder.pos_embed
        expected = actual = x
        every_token = model._kept_tokens(torch.arange(100).expand(2, -1), x.dtype)
        for layer in encoder.layers[2:6]:  # windowed and global layers
            expected = layer(expected)
            actual = layer(actual, every_token)
    assert relative_error(actual, expected) <= 1e-5


# --- the pruned path against the masked reference ------------------------------------------------------------------


@pytest.mark.parametrize("rates", [[0.5, 0.7], [0.8, 0.3]])
def test_pruned_path_matches_masked_reference(rates):
    model = tiny_model()
    pixel_values, guidance = inputs()
    with torch.no_grad():
        output = model(pixel_values, guidance_embeds=guidance, prune_rates=rates)
        expected, expected_scores, expected_keeps = reference_forward(model, pixel_values, guidance, rates)
    assert relative_error(output.last_hidden_state, expected) <= 1e-5
    for stage, rate in enumerate(rates):
        kept = output.keep_indices[stage]
        assert kept.shape == (2, 100 - round(rate * 100)) and kept.dtype == torch.long
        assert torch.equal(kept, kept.sort(dim=-1).values)
        assert torch.equal(kept, expected_keeps[stage].nonzero()[:, 1].view(2, -1))
        assert relative_error(output.token_scores[stage], expected_scores[stage]) <= 1e-5


def test_the_config_says_how_many_tokens_a_rate_keeps():
    """K = N - round(r N), at least one, from the config alone (the model card uses it); the model asks the config."""
    config = tiny_vision_config()
    assert [config.num_kept_tokens(rate) for rate in (0, 0.5, 0.704, 0.999)] == [100, 50, 30, 1]
    assert [tiny_model().num_kept_tokens(rate) for rate in (0.3, 0.9)] == [70, 10]


def test_pruning_changes_the_output_and_reactivates_tokens():
    model = tiny_model()
    pixel_values, guidance = inputs()
    with torch.no_grad():
        dense = model(pixel_values).last_hidden_state
        pruned = model(pixel_values, guidance_embeds=guidance, prune_rates=[0.7, 0.3])
    assert relative_error(pruned.last_hidden_state, dense) > 1e-3
    first, second = (set(k.tolist()) for k in (pruned.keep_indices[0][0], pruned.keep_indices[1][0]))
    # the second stage re-scores the full grid: tokens frozen by the first stage come back
    assert len(second - first) >= 40


def test_pruned_tokens_keep_their_features_until_the_next_stage():
    model = tiny_model()
    pixel_values, guidance = inputs()
    with torch.no_grad():
        output = model(pixel_values, guidance_embeds=guidance, output_hidden_states=True)
    hidden = [h.flatten(1, 2) for h in output.hidden_states]  # hidden[i] is the output of layer i (1-based)
    kept = torch.zeros(2, 100, dtype=torch.bool).scatter(1, output.keep_indices[0], True)
    for layer in (3, 4):  # stage 1 runs layers 3 and 4 after pruning at layer 2
        assert torch.equal(hidden[layer][~kept], hidden[2][~kept])
        assert not torch.allclose(hidden[layer][kept], hidden[2][kept])


def test_images_in_a_batch_are_pruned_independently():
    model = tiny_model()
    pixel_values, guidance = inputs(batch_size=3)
    with torch.no_grad():
        batched = model(pixel_values, guidance_embeds=guidance)
        single = model(pixel_values[1:2], guidance_embeds=guidance[1:2])
    assert not torch.equal(batched.keep_indices[0][0], batched.keep_indices[0][1])
    assert torch.equal(single.keep_indices[1][0], batched.keep_indices[1][1])
    assert relative_error(single.last_hidden_state[0], batched.last_hidden_state[1]) <= 1e-5


# --- several guidances per image: layers run once per image until a stage prunes -------------------------------------


# Images 0, 1, 2 carry 2, 1 and 3 guidances, listed out of order.
IMAGE_INDICES = [2, 0, 1, 2, 0, 2]


@pytest.mark.parametrize("rates", [[0.5, 0.7], [0.0, 0.8]])
def test_shared_prefix_equals_one_copy_of_the_image_per_guidance(rates):
    """Stage 1 (layers 3-4) and stage 2 (layers 5-6) each hold a windowed and a global layer. Both paths run the same
    operations on the same rows, but the prefix's matrix products see 3 images in one path and 6 in the other, and
    the CPU's GEMM may block (and so sum) differently for another row count: float32 rounding, so 1e-5 relative
    (observed: 0 or a few 1e-7). The kept sets must be identical."""
    model = tiny_model()
    pixel_values, _ = inputs(batch_size=3)
    indices = torch.tensor(IMAGE_INDICES)
    guidance = torch.randn(len(IMAGE_INDICES), GUIDANCE_DIM, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        shared = model(pixel_values, guidance_embeds=guidance, prune_rates=rates, image_indices=indices)
        copies = model(pixel_values[indices], guidance_embeds=guidance, prune_rates=rates)
    assert shared.last_hidden_state.shape == (6, 16, 10, 10)
    assert relative_error(shared.last_hidden_state, copies.last_hidden_state) <= 1e-5
    for mine, theirs in zip(shared.keep_indices, copies.keep_indices):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(shared.token_scores, copies.token_scores):
        assert relative_error(mine, theirs) <= 1e-5
    # two guidances of the same image prune differently
    assert not torch.equal(shared.keep_indices[1][0], shared.keep_indices[1][3])


@pytest.mark.parametrize(
    "rates, rows_per_layer",
    [
        (None, [3, 3, 6, 6, 6, 6]),  # the config's rates: the prefix (layers 1-2) once per image
        ([0.0, 0.8], [3, 3, 3, 3, 6, 6]),  # a stage at rate 0 keeps every token, so it runs once per image too
        ([0.0, 0.0], [3] * 6),  # the dense model: the whole ViT and the neck once per image
    ],
)
def test_layers_run_once_per_image_until_a_stage_prunes(rates, rows_per_layer):
    """The rows each layer and the neck see: one per image until the first stage that prunes, then one per guidance.
    The output has one row per guidance either way."""
    model = tiny_model()
    pixel_values, _ = inputs(batch_size=3)
    guidance = torch.randn(len(IMAGE_INDICES), GUIDANCE_DIM)
    rows = []
    encoder = model.vision_encoder
    handles = [
        module.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
        for module in (*encoder.layers, encoder.neck)
    ]
    with torch.no_grad():
        output = model(
            pixel_values, guidance_embeds=guidance, prune_rates=rates, image_indices=torch.tensor(IMAGE_INDICES)
        )
    for handle in handles:
        handle.remove()
    assert rows == rows_per_layer + [rows_per_layer[-1]]
    assert output.last_hidden_state.shape[0] == len(IMAGE_INDICES)


def test_image_indices_without_pruning_give_one_row_per_guidance():
    """Nothing to prune: the encoder and the neck run once per image, and each guidance gets its image's row."""
    model = tiny_model(prune_layers=[], prune_rates=[])
    pixel_values, _ = inputs(batch_size=2)
    indices = torch.tensor([1, 1, 0])
    with torch.no_grad():
        shared = model(pixel_values, guidance_embeds=torch.randn(3, GUIDANCE_DIM), image_indices=indices)
        dense = model(pixel_values).last_hidden_state
    assert shared.keep_indices is None
    # both run the same operations on the same 2 images in one process: equal
    assert torch.equal(shared.last_hidden_state, dense[indices])


def test_decode_masks_passes_image_indices_on():
    """SAM's side decodes one mask per guidance from the shared prefix; tolerance as in
    `test_shared_prefix_equals_one_copy_of_the_image_per_guidance` (the prefix on 2 images here, 3 rows there)."""
    from modeling_vltp import VLTPSamModel
    from modeling_vltp.testing import tiny_config

    segmenter = randomized(VLTPSamModel(tiny_config()))
    pixel_values = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    guidance_dim = segmenter.config.vision_config.guidance_dim
    seg_embeds = torch.randn(3, guidance_dim, generator=torch.Generator().manual_seed(3))
    indices = torch.tensor([1, 0, 1])
    with torch.no_grad():
        masks, ious, vision = segmenter.decode_masks(pixel_values, seg_embeds, image_indices=indices)
        expected_masks, expected_ious, _ = segmenter.decode_masks(pixel_values[indices], seg_embeds)
    assert masks.shape[0] == 3 and vision.keep_indices[0].shape[0] == 3
    assert relative_error(masks, expected_masks) <= 1e-5
    assert relative_error(ious, expected_ious) <= 1e-5


@pytest.mark.parametrize(
    "guidances, indices, message",
    [
        (None, torch.tensor([0, 1]), "image_indices maps guidances to images, so it needs guidance_embeds"),
        (3, torch.tensor([0, 1]), r"guidance_embeds must have shape \(num_guidances, guidance_dim\) = \(2, 24\)"),
        (2, torch.tensor([0, 2]), r"image_indices must be in \[0, 1\]"),
        (2, torch.tensor([-1, 0]), r"image_indices must be in \[0, 1\]"),
        (2, torch.tensor([0.0, 1.0]), "image_indices must be a 1-D integer tensor"),
        (2, torch.tensor([[0, 1]]), "image_indices must be a 1-D integer tensor"),
    ],
)
def test_bad_image_indices_raise_clear_errors(guidances, indices, message):
    model = tiny_model()
    pixel_values, _ = inputs(batch_size=2)
    guidance = torch.zeros(guidances, GUIDANCE_DIM) if guidances else None
    with pytest.raises(ValueError, match=message):
        model(pixel_values, guidance_embeds=guidance, image_indices=indices)


def test_all_zero_rates_without_guidance_run_the_dense_encoder():
    model = tiny_model()
    pixel_values, _ = inputs()
    with torch.no_grad():
        assert torch.equal(model(pixel_values, prune_rates=[0.0, 0.0])[0], model(pixel_values)[0])


def test_forward_rates_override_the_config():
    model = tiny_model()
    pixel_values, guidance = inputs(batch_size=1)
    with torch.no_grad():
        default = model(pixel_values, guidance_embeds=guidance)
        override = model(pixel_values, guidance_embeds=guidance, prune_rates=[0.8, 0.9])
    assert [k.shape[1] for k in default.keep_indices] == [50, 30]
    assert [k.shape[1] for k in override.keep_indices] == [20, 10]


# --- training ------------------------------------------------------------------------------------------------------


def test_pruning_targets_mark_every_patch_with_a_positive_pixel():
    masks = torch.zeros(1, 32, 48)
    masks[0, 0, 0] = 1  # patch (0, 0)
    masks[0, 17, 40] = 1  # patch (1, 2)
    masks[0, 20:25, 16:18] = 1  # patch (1, 1)
    targets = pruning_targets(masks, patch_size=16)
    assert targets.shape == (1, 6)
    assert targets.tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        pruning_targets(torch.zeros(1, 30, 32), patch_size=16)


def test_segmentation_loss_reaches_the_prune_decoder_through_the_straight_through_gate():
    model = tiny_model().train()
    pixel_values, guidance = inputs()
    output = model(pixel_values, guidance_embeds=guidance)
    output.last_hidden_state.square().mean().backward()
    grads = [p.grad for p in model.prune_decoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    model.eval()
    with torch.no_grad():
        inference = model(pixel_values, guidance_embeds=guidance).last_hidden_state
    # The gate must not change forward values; the bound only allows for the attention kernel torch picks when
    # autograd records, which differs from the inference one by float rounding (seen: 3e-7 on dense layers too).
    assert relative_error(output.last_hidden_state.detach(), inference) <= 1e-5


def test_pruning_loss_trains_the_prune_decoder_towards_the_target():
    torch.manual_seed(0)
    model = VLTPSamVisionModel(tiny_vision_config(prune_layers=[2], prune_rates=[0.5]))
    randomized(model.vision_encoder)  # distinguishable tokens, as a pretrained ViT gives; the decoder keeps its init
    model.train()
    for p in model.vision_encoder.parameters():
        p.requires_grad_(False)
    pixel_values, guidance = inputs(batch_size=2)
    masks = torch.zeros(2, 160, 160)
    masks[0, :64, :64] = 1
    masks[1, 96:, 32:] = 1
    targets = pruning_targets(masks, patch_size=16)
    optimizer = torch.optim.Adam(model.prune_decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        output = model(pixel_values, guidance_embeds=guidance)
        loss = vltp_pruning_loss(output.keep_probs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # At rate 0.5 more tokens must be kept than the targets cover, so L_P has a floor well above 0.
    assert losses[-1] < 0.6 * losses[0]
    kept = torch.zeros(2, 100).scatter(1, output.keep_indices[0], 1.0)
    assert ((kept * targets).sum() / targets.sum()).item() > 0.9, "the target patches must end up kept"


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pixel_shape, guidance_shape, rates, message",
    [
        ((2, 3, 128, 128), (2, GUIDANCE_DIM), None, "pixel_values must have shape"),
        ((2, 1, 160, 160), (2, GUIDANCE_DIM), None, "pixel_values must have shape"),
        ((3, 160, 160), None, None, "pixel_values must have shape"),
        ((2, 3, 160, 160), (2, 256), None, "guidance_embeds must have shape"),
        ((2, 3, 160, 160), (1, GUIDANCE_DIM), None, "guidance_embeds must have shape"),
        ((2, 3, 160, 160), (2, GUIDANCE_DIM), [0.5, 1.0], r"prune_rates must each be in \[0, 1\)"),
        ((2, 3, 160, 160), (2, GUIDANCE_DIM), [-0.1, 0.5], r"prune_rates must each be in \[0, 1\)"),
        ((2, 3, 160, 160), (2, GUIDANCE_DIM), [0.5], "one rate per pruning stage"),
        ((2, 3, 160, 160), None, [0.5, 0.5], "prune_rates .* were given without guidance_embeds"),
        ((2, 3, 160, 160), "nan", None, "guidance_embeds holds NaN or infinite values"),
        ((2, 3, 160, 160), "inf", None, "guidance_embeds holds NaN or infinite values"),
    ],
)
def test_bad_inputs_raise_clear_errors(pixel_shape, guidance_shape, rates, message):
    model = tiny_model()
    if isinstance(guidance_shape, str):  # one non-finite value in a guidance of the right shape
        guidance = torch.zeros(2, GUIDANCE_DIM).index_fill_(1, torch.tensor([3]), float(guidance_shape))
    else:
        guidance = torch.zeros(guidance_shape) if guidance_shape else None
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(pixel_shape), guidance_embeds=guidance, prune_rates=rates)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prune_layers=[4, 2]), "strictly increasing"),
        (dict(prune_layers=[2, 2]), "strictly increasing"),
        (dict(prune_layers=[0, 2]), r"prune_layers must be 1-based layer numbers in \[1, 5\]"),
        (dict(prune_layers=[2, 6]), r"prune_layers must be 1-based layer numbers in \[1, 5\]"),
        (dict(prune_rates=[0.5, 1.0]), r"prune_rates must each be in \[0, 1\)"),
        (dict(prune_rates=[0.5]), "prune_rates must give one rate per pruning stage"),
        (dict(prune_decoder_num_attention_heads=0), "prune_decoder_num_attention_heads must be a positive integer"),
        (dict(prune_decoder_num_attention_heads=3), r"prune_decoder_num_attention_heads \(3\) must divide"),
        (dict(prune_decoder_num_attention_heads=16), r"cross-attention width .* \(8\)"),
        (dict(prune_decoder_mlp_dim=-1), "prune_decoder_mlp_dim must be a positive integer"),
        (dict(guidance_dim=0), "guidance_dim must be a positive integer"),
        (dict(prune_temperature=0.0), "prune_temperature must be a finite number > 0, got 0.0"),
        (dict(prune_temperature=float("inf")), "prune_temperature must be a finite number > 0, got inf"),
    ],
)
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_vision_config(**fields)


def test_config_presets_follow_the_paper():
    for preset, layers, hidden in [("vit_b", [6, 9], 768), ("vit_l", [12, 18], 1024), ("vit_h", [16, 24], 1280)]:
        config = getattr(VLTPVisionConfig, preset)()
        assert config.prune_layers == layers and config.prune_rates == [0.5, 0.5] and config.hidden_size == hidden
        # each stage starts right after the 2nd and 3rd global-attention layer (0-based indexes + 1)
        assert [g + 1 for g in config.global_attn_indexes[1:3]] == layers
    assert VLTPVisionConfig.vit_h(prune_rates=[0.8, 0.8]).prune_rates == [0.8, 0.8]


# --- saving, loading and the Auto classes ---------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = VLTPSamVisionModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.prune_layers == [2, 4] and reloaded.config.prune_rates == [0.5, 0.7]
    pixel_values, guidance = inputs()
    with torch.no_grad():
        assert torch.equal(model(pixel_values, guidance).last_hidden_state, reloaded(pixel_values, guidance)[0])


@pytest.mark.parametrize("checkpoint", ["sam_vision_model", "sam_model"])
def test_loads_sam_checkpoints_and_initialises_only_the_prune_decoder(tmp_path, checkpoint):
    reference = tiny_model()
    sam_vision = sam_with_same_weights(reference)
    if checkpoint == "sam_vision_model":
        sam_vision.save_pretrained(tmp_path)
    else:
        sam_config = SamConfig(
            vision_config=SamVisionConfig_from(reference.config).to_dict(),
            prompt_encoder_config={"hidden_size": 16, "image_size": 160, "patch_size": 16},
            mask_decoder_config={"hidden_size": 16, "num_attention_heads": 2, "mlp_dim": 32},
        )
        sam = SamModel(sam_config)
        sam.vision_encoder.load_state_dict(sam_vision.vision_encoder.state_dict())
        sam.save_pretrained(tmp_path)
    model = VLTPSamVisionModel.from_pretrained(
        tmp_path, prune_layers=[3], prune_rates=[0.6], guidance_dim=GUIDANCE_DIM
    ).eval()
    assert model.config.prune_layers == [3] and model.config.prune_rates == [0.6]
    assert model.config.model_type == "vltp_sam_vision"
    for name, tensor in sam_vision.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    decoder_weight = model.prune_decoder.transformer.layers[0].mlp.lin1.weight
    assert 0.005 < decoder_weight.std().item() < 0.05, "the prune decoder is initialised with std 0.02"
    pixel_values, guidance = inputs()
    with torch.no_grad():
        assert relative_error(model(pixel_values)[0], sam_vision(pixel_values).last_hidden_state) <= 1e-5
        assert model(pixel_values, guidance_embeds=guidance).keep_indices[0].shape == (2, 40)


def test_loading_with_an_invalid_pruning_plan_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prune_rates must give one rate per pruning stage"):
        VLTPSamVisionModel.from_pretrained(tmp_path, prune_layers=[1, 2, 3])


def test_auto_classes_know_the_model_type(tmp_path):
    assert isinstance(AutoConfig.for_model("vltp_sam_vision"), VLTPVisionConfig)
    tiny_model().save_pretrained(tmp_path)
    assert isinstance(AutoModel.from_pretrained(tmp_path), VLTPSamVisionModel)


# --- full sizes on the meta device and MAC counts --------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, rates, paper_gmacs",
    [
        ("vit_h", None, 2976),
        ("vit_h", [0.5, 0.5], 2227),
        ("vit_h", [0.8, 0.8], 1782),
        ("vit_h", [0.9, 0.9], 1636),
        ("vit_l", None, 1491),
        ("vit_l", [0.5, 0.5], 1118),
        ("vit_l", [0.8, 0.8], 895),
    ],
)
def test_full_size_gmacs_match_the_paper(preset, rates, paper_gmacs):
    """Tables 5 and 8 of the paper, within 3% (the paper's counter and ours treat the relative-position terms and SAM's
    window padding slightly differently)."""
    with torch.device("meta"):
        model = VLTPSamVisionModel(getattr(VLTPVisionConfig, preset)())
        pixel_values = torch.empty(1, 3, 1024, 1024)
        guidance = torch.empty(1, 256) if rates else None
        output = model(pixel_values, guidance_embeds=guidance, prune_rates=rates)
        gmacs = count_gmacs(model, pixel_values, guidance_embeds=guidance, prune_rates=rates)
    assert output.last_hidden_state.shape == (1, 256, 64, 64)
    if rates:
        assert [k.shape for k in output.keep_indices] == [(1, 4096 - round(r * 4096)) for r in rates]
    assert abs(gmacs / paper_gmacs - 1) <= 0.03, f"{gmacs:.1f} GMAC vs the paper's {paper_gmacs}"


def test_prune_decoder_costs_about_6_gmacs_on_vit_h():
    with torch.device("meta"):
        model = VLTPSamVisionModel(VLTPVisionConfig.vit_h())
        gmacs = count_gmacs(model.prune_decoder, torch.empty(1, 64, 64, 1280), guidance_embeds=torch.empty(1, 256))
    assert 4.5 <= gmacs <= 6.5


def test_counting_on_the_cpu_agrees_with_the_meta_device():
    """The CPU picks a fused attention kernel torch has no formula for; `count_gmacs` must still count attention."""
    model = tiny_model()
    pixel_values, guidance = inputs(batch_size=1)
    cpu = count_gmacs(model, pixel_values, guidance_embeds=guidance)
    meta_model = model.to("meta")
    meta = count_gmacs(meta_model, pixel_values.to("meta"), guidance_embeds=guidance.to("meta"))
    assert cpu == pytest.approx(meta, rel=1e-9)
    dense = count_gmacs(tiny_model(), pixel_values)
    assert cpu < dense
