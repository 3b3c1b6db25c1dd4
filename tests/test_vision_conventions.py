"""VLTPSamVisionModel follows transformers' and torch's conventions: output capture, gradient checkpointing with the
user's kwargs, FSDP2 sharding and accelerate's offload of pruned layers, and `torch.compile(fullgraph=True)`."""

import pytest
import torch

from modeling_vltp import VLTPSamVisionModel
from tests.test_vision_model import (
    GUIDANCE_DIM,
    inputs,
    randomized,
    relative_error,
    sam_with_same_weights,
    tiny_model,
    tiny_vision_config,
)

# The tiny model prunes after layers 2 and 4: 0-based layers 2 (windowed), 3 (global), 4 (windowed), 5 (global) run on
# kept tokens.
PRUNED_WINDOWED, PRUNED_GLOBAL = 2, 3


# --- output_hidden_states and output_attentions ---------------------------------------------------------------------


def test_hidden_states_selected_by_index_follow_transformers():
    """transformers 5: a list of indices (negative ones count from the end) returns those, `None` elsewhere."""
    model = tiny_model()
    pixel_values, guidance = inputs()
    with torch.no_grad():
        every = model(pixel_values, guidance_embeds=guidance, output_hidden_states=True).hidden_states
        chosen = model(pixel_values, guidance_embeds=guidance, output_hidden_states=[0, 3, -1]).hidden_states
    assert len(every) == len(chosen) == 7
    for i in range(7):
        if i in (0, 3, 6):
            assert torch.equal(chosen[i], every[i])
        else:
            assert chosen[i] is None


def test_attentions_of_dense_and_pruned_layers():
    model = randomized(VLTPSamVisionModel._from_config(tiny_vision_config(), attn_implementation="eager"))
    pixel_values, guidance = inputs()
    with torch.no_grad():
        dense = model(pixel_values, output_attentions=True).attentions
        expected = sam_with_same_weights(model, "eager")(pixel_values, output_attentions=True).attentions
        output = model(pixel_values, guidance_embeds=guidance, output_attentions=True)
    assert len(dense) == len(expected) == 6
    for mine, theirs in zip(dense, expected):
        assert mine.shape == theirs.shape and relative_error(mine, theirs) <= 1e-5
    attentions, heads = output.attentions, 2
    kept_global = output.keep_indices[0].shape[1]
    assert attentions[PRUNED_GLOBAL].shape == (2 * heads, kept_global, kept_global)
    # windowed: 10x10 tokens in 4x4 windows -> 3x3 padded windows of 16 places, pruned places are no keys
    assert attentions[PRUNED_WINDOWED].shape == (2 * 9 * heads, 16, 16)
    for weights in attentions:
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
    kept = torch.zeros(2, 12, 12, dtype=torch.bool)
    kept[:, 10:, :] = kept[:, :, 10:] = True  # SAM's padding places stay keys
    kept[:, :10, :10] = torch.zeros(2, 100, dtype=torch.bool).scatter(1, output.keep_indices[0], True).view(2, 10, 10)
    is_key = kept.view(2, 3, 4, 3, 4).permute(0, 1, 3, 2, 4).reshape(2 * 9, 1, 1, 16)
    weights = attentions[PRUNED_WINDOWED].view(2 * 9, heads, 16, 16)
    assert torch.equal(weights.masked_select(~is_key), torch.zeros_like(weights.masked_select(~is_key)))


def test_sdpa_returns_no_attentions_as_sam_does():
    model = tiny_model()
    pixel_values, guidance = inputs()
    with torch.no_grad():
        # SAM's SDPA attention returns `None` weights, which are not recorded
        assert model(pixel_values, guidance_embeds=guidance, output_attentions=True).attentions == ()


# --- gradient checkpointing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_uses_the_users_kwargs_in_pruned_layers(use_reentrant):
    """Same gradients with and without checkpointing, within float32 rounding: a reentrant checkpoint runs the first
    forward without autograd, where torch's CPU attention picks another SDPA kernel (forward values differ by ~3e-7
    relative), so 1e-5 of the largest gradient."""
    pixel_values, guidance = inputs()
    grads, grad_fns = [], []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        layer = model.vision_encoder.layers[PRUNED_GLOBAL]
        handle = layer.register_forward_hook(lambda m, args, out: grad_fns.append(type(out.grad_fn).__name__))
        model(pixel_values, guidance_embeds=guidance).last_hidden_state.sum().backward()
        handle.remove()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert relative_error(grads[1], grads[0]) <= 1e-5
    # a reentrant checkpoint shows as its own autograd function on the pruned layer's output
    assert ("CheckpointFunctionBackward" in grad_fns[1]) == use_reentrant
    assert "Checkpoint" not in grad_fns[0]


# --- FSDP2 and offloading --------------------------------------------------------------------------------------------


def test_fsdp2_shards_pruned_layers(tmp_path):
    """`fully_shard` on every layer in a one-process gloo group: FSDP2 gathers each layer's parameters in its
    pre-forward hook, which the pruned path now triggers. One process holds the whole parameter, so the kernels and
    inputs are those of the plain model; 1e-6 allows for FSDP's own copies of the parameters changing strides."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_model()
    pixel_values, guidance = inputs()
    with torch.no_grad():
        expected = model(pixel_values, guidance_embeds=guidance).last_hidden_state
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = tiny_model()
        for layer in sharded.vision_encoder.layers:
            fully_shard(layer)
        fully_shard(sharded)
        with torch.no_grad():
            actual = sharded(pixel_values, guidance_embeds=guidance).last_hidden_state
        sharded.train()
        sharded(pixel_values, guidance_embeds=guidance).last_hidden_state.sum().backward()
    finally:
        torch.distributed.destroy_process_group()
    assert relative_error(actual, expected) <= 1e-6
    assert all(p.grad is not None for p in sharded.vision_encoder.layers[PRUNED_GLOBAL].parameters())


@pytest.mark.parametrize("whole_encoder_on_disk", [False, True])
def test_offloaded_model_gives_the_same_outputs(tmp_path, whole_encoder_on_disk):
    """accelerate loads offloaded weights in each module's own forward: every parameter must be used there. Same
    weights and kernels as the plain model, so 1e-6 (only the loading path differs)."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    if whole_encoder_on_disk:
        device_map = {"vision_encoder": "disk", "prune_decoder": "disk"}
    else:
        device_map = {f"vision_encoder.layers.{i}": "disk" if i % 2 else "cpu" for i in range(6)}
        device_map.update({"vision_encoder.patch_embed": "cpu", "vision_encoder.pos_embed": "cpu"})
        device_map.update({"vision_encoder.neck": "disk", "prune_decoder": "disk"})
    offloaded = VLTPSamVisionModel.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    assert offloaded.vision_encoder.layers[PRUNED_GLOBAL].attn.qkv.weight.device.type == "meta"
    pixel_values, guidance = inputs()
    with torch.no_grad():
        for rates in ([0.0, 0.0], [0.5, 0.7]):
            expected = model(pixel_values, guidance_embeds=guidance, prune_rates=rates)
            actual = offloaded(pixel_values, guidance_embeds=guidance, prune_rates=rates)
            assert relative_error(actual.last_hidden_state, expected.last_hidden_state) <= 1e-6
            for mine, theirs in zip(actual.keep_indices, expected.keep_indices):
                assert torch.equal(mine, theirs)


def test_kept_tokens_move_with_accelerates_device_hooks():
    """accelerate's hooks move a layer's inputs with `send_to_device`, which moves any object with a `to`. Without
    it the kept-token bookkeeping would stay on the prune decoder's device, and a `device_map` that splits a pruned
    stage over two accelerators would fail in the layer's gather. "meta" stands in for a second device."""
    from accelerate.utils import send_to_device

    model = tiny_model()
    kept = model._kept_tokens(torch.tensor([[0, 5, 17, 99], [1, 2, 50, 98]]), torch.float32)
    moved = send_to_device(kept, "meta")
    assert type(moved) is type(kept)
    for name in ("indices", "rows", "cols", "window_indices", "window_key_bias"):
        before, after = getattr(kept, name), getattr(moved, name)
        assert before.device.type == "cpu" and after.device.type == "meta"
        assert after.shape == before.shape and after.dtype == before.dtype


# --- torch.compile ---------------------------------------------------------------------------------------------------


def test_pruned_encoder_compiles_without_graph_breaks():
    """`fullgraph=True` fails on any graph break. The "aot_eager" backend traces exactly what inductor would get
    (dynamo + AOT autograd) without generating and compiling C++ code, which takes minutes on this CPU. The traced
    graph runs the same ATen ops, possibly decomposed: 1e-5 relative for float32 rounding."""
    model = tiny_model()
    pixel_values, _ = inputs(batch_size=2)
    indices = torch.tensor([1, 0, 1])
    guidance = torch.randn(3, GUIDANCE_DIM, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for kwargs in (dict(image_indices=indices, guidance_embeds=guidance), dict(guidance_embeds=guidance[:2])):
            expected = model(pixel_values, **kwargs)
            actual = compiled(pixel_values, **kwargs)
            assert relative_error(actual.last_hidden_state, expected.last_hidden_state) <= 1e-5
            for mine, theirs in zip(actual.keep_indices, expected.keep_indices):
                assert torch.equal(mine, theirs)
