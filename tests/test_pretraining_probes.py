"""The learning benchmark's pretraining probes (`modeling_vltp.testing`): the targets of `TaskMapProbe` and that its
loss is computed on the embeddings the model's SAM side actually produced; `PretrainingProbes`' task weight."""

import pytest
import torch

from modeling_vltp.testing import PretrainingProbes, TaskMapProbe, task_maps, tiny_model_and_processor


def test_task_maps_give_each_patch_its_covered_share():
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, :8, :8] = True  # row 0: the whole top-left patch
    masks[0, :8, 8:12] = True  # and half of the patch to its right
    masks[1, 16:, 16:] = True  # row 1: the bottom-right quarter
    masks[2, 4:6, 4:6] = True  # row 2 (another image): 4 pixels of a 64-pixel patch
    maps = task_maps(
        masks, image_of_row=torch.tensor([0, 0, 1]), task_index=torch.tensor([2, 0, 2]), num_tasks=3, grid=4, chunk=2
    )  # two chunks; task 1 has no row for either image: it covers nothing

    assert maps.shape == (2, 3, 4, 4)
    expected = torch.zeros(2, 3, 4, 4)
    expected[0, 2, 0, 0], expected[0, 2, 0, 1] = 1.0, 0.5
    expected[0, 0, 2:, 2:] = 1.0
    expected[1, 2, 0, 0] = 4 / 64
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)  # shares of 64 pixels are exact in float32


def _batch(processor, answers):
    """Three rows on three different random images (one mask each), answered with `answers`."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (48, 64, 3), generator=generator, dtype=torch.uint8).numpy() for _ in answers]
    masks = [torch.rand(48, 64, generator=generator) > 0.5 for _ in answers]
    tasks = ["sit on it", "hold the hot soup", "cut the food"][: len(answers)]
    return processor(images=images, tasks=tasks, answers=answers, masks=masks)


def test_task_map_probe_scores_the_embeddings_the_model_produced():
    model, processor = tiny_model_and_processor()
    grid = model.vision_model.grid_size
    probe = TaskMapProbe(model.config, num_tasks=3)
    batch = _batch(processor, ["Sure, [SEG].", "Nothing here fits.", "It is [SEG]."])
    maps = task_maps(batch["masks"], torch.arange(3), torch.arange(3), 3, grid)

    with pytest.raises(RuntimeError, match="call `watch\\(model\\)`"):
        probe(model(**batch), maps)

    handle = probe.watch(model)
    outputs = model(**batch)
    assert outputs.seg_sample_indices.tolist() == [0, 2]
    loss = probe(outputs, maps)

    # The same loss from the SAM side run on its own for the rows with [SEG]: the probe saw the model's embeddings,
    # each row's own.
    with torch.no_grad():
        embeddings = model.vision_model(
            batch["sam_pixel_values"][outputs.seg_sample_indices], guidance_embeds=outputs.seg_embeds
        ).last_hidden_state
        expected = torch.nn.functional.binary_cross_entropy_with_logits(probe.classifier(embeddings), maps[[0, 2]])
    torch.testing.assert_close(loss, expected)  # same kernels, same inputs, one process

    # Its gradient reaches the ViT (what the probe is for) and the probe itself.
    model.zero_grad()
    loss.backward()
    assert model.vision_model.vision_encoder.patch_embed.projection.weight.grad.abs().sum() > 0
    assert probe.classifier.weight.grad.abs().sum() > 0

    # Embeddings of another forward than the one whose output is given (here the SAM side alone, on all three rows).
    model.vision_model(batch["sam_pixel_values"])
    with pytest.raises(ValueError, match="made 3 image features for 2 task maps"):
        probe(outputs, maps)

    # A batch without [SEG] runs no SAM side: no loss, and the embeddings kept from the batch before are dropped, so
    # that, unwatched, the next call finds none.
    model(**batch)
    no_seg = _batch(processor, ["Nothing here fits.", "Sorry, nothing here fits."])
    assert probe(model(**no_seg), maps[:2]).item() == 0
    handle.remove()
    model(**batch)
    with pytest.raises(RuntimeError, match="call `watch"):
        probe(model(**batch), maps)


def test_task_map_probe_on_the_layer_the_prune_decoder_reads():
    model, processor = tiny_model_and_processor()
    encoder = model.vision_model.vision_encoder
    layer = model.config.vision_config.prune_layers[0] - 1
    with pytest.raises(ValueError, match="before the first pruning stage"):
        TaskMapProbe(model.config, num_tasks=3, layer=layer + 1)
    probe = TaskMapProbe(model.config, num_tasks=3, layer=layer)
    batch = _batch(processor, ["It is [SEG].", "Nothing here fits.", "Sure, [SEG]."])
    maps = task_maps(batch["masks"], torch.arange(3), torch.arange(3), 3, model.vision_model.grid_size)

    handle = probe.watch(model)
    outputs = model(**batch)
    assert outputs.seg_sample_indices.tolist() == [0, 2]
    loss = probe(outputs, maps)

    # The same loss from the ViT's layers up to `layer` run on their own for the rows with [SEG].
    with torch.no_grad():
        features = encoder(batch["sam_pixel_values"][[0, 2]])
        for vit_layer in encoder.layers[: layer + 1]:
            features = vit_layer(features)
        logits = probe.classifier(features.permute(0, 3, 1, 2))
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, maps[[0, 2]])
    torch.testing.assert_close(loss, expected)  # same kernels, same inputs, one process

    # Its gradient reaches the layers up to `layer` and none after it.
    model.zero_grad()
    loss.backward()
    assert encoder.layers[layer].mlp.lin2.weight.grad.abs().sum() > 0
    assert encoder.layers[layer + 1].mlp.lin2.weight.grad is None

    model.vision_model(batch["sam_pixel_values"])  # another forward: three images
    with pytest.raises(ValueError, match="made 3 image features for 2 task maps"):
        probe(outputs, maps)

    # Read on their own (benchmarks/task_map_auc.py), the logits of a dense pass of the vision model: one map per
    # image, used once.
    with torch.no_grad():
        features = encoder(batch["sam_pixel_values"])
        for vit_layer in encoder.layers[: layer + 1]:
            features = vit_layer(features)
        expected = probe.classifier(features.permute(0, 3, 1, 2))
        model.vision_model(batch["sam_pixel_values"], prune_rates=[0.0])
        torch.testing.assert_close(probe.logits(), expected)  # same kernels, same inputs, one process
    with pytest.raises(RuntimeError, match="call `watch"):
        probe.logits()
    handle.remove()


@pytest.mark.parametrize("on_layer", [False, True], ids=["neck", "layer"])
@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_task_map_probe_pairs_features_with_their_image_under_image_indices(on_layer, rate):
    """Rows 0 and 2 ask about one image (`image_indices` [0, 1, 0]). The probed layer ran once per image where no
    stage before it pruned (the prune decoder's layer always, the neck at rate 0), else once per `[SEG]` row; either
    way the probe pairs each feature with its image's map: the loss is that of the ungrouped rows of the distinct
    images (rows 0 and 1), or of every row when they ran per row (float32 rounding of other row counts, as in
    tests/test_shared_image_work.py)."""
    model, processor = tiny_model_and_processor()
    layer = model.config.vision_config.prune_layers[0] - 1 if on_layer else None
    probe = TaskMapProbe(model.config, num_tasks=3, layer=layer)
    batch = _batch(processor, ["It is [SEG].", "Sure, [SEG].", "Sure, [SEG]."])
    for name in ("sam_pixel_values", "reshaped_input_sizes", "original_sizes"):
        batch[name][2] = batch[name][0]
    image_of_row = torch.tensor([0, 1, 0])
    maps = task_maps(batch["masks"], image_of_row, torch.arange(3), 3, model.vision_model.grid_size)
    grouped = dict(batch, image_indices=image_of_row)
    for name in ("sam_pixel_values", "reshaped_input_sizes", "original_sizes"):
        grouped[name] = batch[name][:2]
    rows = [0, 1] if on_layer or rate == 0.0 else [0, 1, 2]
    handle = probe.watch(model)
    with torch.no_grad():
        shared = probe(model(**grouped, prune_rates=[rate]), maps, image_of_row)
        copies = probe(
            model(**{name: value[rows] for name, value in batch.items()}, prune_rates=[rate]), maps[image_of_row[rows]]
        )
    handle.remove()
    assert shared.item() == pytest.approx(copies.item(), rel=1e-5)


def test_task_map_probe_pairs_a_row_with_two_seg_with_its_one_image():
    """A row with two `[SEG]` (the model reads any number): at rate 0 the neck ran once for that row's image, so the
    probe pairs one feature with that image's map, as for a dense pass of the vision model over the two images."""
    model, processor = tiny_model_and_processor()
    batch = _batch(processor, ["Sure, it is [SEG].", "It is [SEG]."])
    batch["input_ids"][0, (batch["labels"][0] != -100).nonzero()[0, 0]] = processor.seg_token_id
    maps = task_maps(batch["masks"], torch.arange(2), torch.arange(2), 3, model.vision_model.grid_size)
    probe = TaskMapProbe(model.config, num_tasks=3)
    handle = probe.watch(model)
    with torch.no_grad():
        outputs = model(**batch, prune_rates=[0.0])
        loss = probe(outputs, maps)
        dense = model.vision_model(batch["sam_pixel_values"]).last_hidden_state
    handle.remove()
    assert outputs.seg_sample_indices.tolist() == [0, 0, 1]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(probe.classifier(dense), maps)
    torch.testing.assert_close(loss, expected)  # the same operations on the same two images, one process


def test_pretraining_probes_weigh_the_task_probe_and_leave_it_out_at_zero():
    model, processor = tiny_model_and_processor()
    batch = _batch(processor, ["Sure, [SEG].", "Nothing here fits.", "It is [SEG]."])
    task_index, tasks_present = torch.tensor([2, 0, 1]), torch.tensor([[0.0, 0, 1], [1, 1, 0], [0, 1, 0]])
    outputs = model(**batch, output_hidden_states=True)
    probes = {weight: PretrainingProbes(model.config, 3, task_weight=weight) for weight in (0.0, 1.0, 2.5)}
    for probe in probes.values():
        probe.load_state_dict(probes[1.0].state_dict())  # the same probe weights, three task weights
    losses = {w: probe(outputs, batch["input_ids"], task_index, tasks_present) for w, probe in probes.items()}

    # The task probe's own loss: cross-entropy of the [SEG] rows' (0 and 2) task logits.
    task = torch.nn.functional.cross_entropy(probes[1.0].task(outputs.seg_embeds), task_index[[0, 2]])
    assert task > 0
    torch.testing.assert_close(losses[1.0] - losses[0.0], task)  # float32 rounding of one subtraction
    torch.testing.assert_close(losses[2.5] - losses[0.0], 2.5 * task)

    # At weight 0 the task probe is left out of the graph: its weights get no gradient, the image probe's do.
    losses[0.0].backward()
    assert probes[0.0].task.weight.grad is None
    assert probes[0.0].image.weight.grad.abs().sum() > 0
