"""Memory per GPU for finetuning LLaVA-1.5-7B + SAM ViT-H under DDP, ZeRO-2, ZeRO-3 and FSDP2, from the real
parameter counts (the model built on the meta device).

Assumptions: every weight held in bf16 (2 bytes); gradients in bf16 for trained parameters (2 bytes); the optimiser
keeps an fp32 master copy and Adam's two fp32 moments of each trained parameter (12 bytes). DDP replicates all of
it; ZeRO-2 shards gradients and optimiser states over the N GPUs; ZeRO-3 and FSDP2 (full sharding) shard the weights
too. Activations, the all-gathered layer of ZeRO-3/FSDP2, buffers and fragmentation come on top.

    python benchmarks/memory_arithmetic.py [--gpus 8]
"""

import argparse

import torch

from modeling_vltp import VLTPConfig, VLTPForTaskSegmentation

GIB = 1024**3
LORA_R = 8
LORA_TARGETS = ("q_proj", "v_proj")


def count(modules) -> int:
    """Parameters of `modules`, each shared parameter once."""
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


def parameter_counts() -> dict:
    config = VLTPConfig.llava15_7b_sam_vit_h()
    with torch.device("meta"):
        model = VLTPForTaskSegmentation(config)
    language = model.llava.model.language_model
    hidden = language.config.hidden_size
    lora = 0
    for name, module in language.named_modules():
        if name.split(".")[-1] in LORA_TARGETS:
            lora += LORA_R * (module.in_features + module.out_features)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    token_rows = 2 * hidden * (1 if tied else 2)  # [SEG] and <image>, embedding (and output) rows
    sam_side = [model.vision_model, model.prompt_encoder, model.mask_decoder]
    return {
        "all": count([model]),
        "llava": count([model.llava]),
        "sam_side": count([*sam_side, model.shared_image_embedding]),
        "prune_decoder": count([model.vision_model.prune_decoder]),
        "stage1_trained": lora + count([model.text_hidden_fcs, model.mask_decoder]) + token_rows,
        "lora": lora,
        "text_hidden_fcs": count([model.text_hidden_fcs]),
        "mask_decoder": count([model.mask_decoder]),
        "token_rows": token_rows,
        "stage2_trained": count([model.vision_model.prune_decoder, model.mask_decoder]),
    }


def per_gpu(weights: int, trained: int, gpus: int) -> dict:
    """GiB per GPU: (weights, gradients, optimiser states, total) under each engine."""
    w, g, o = 2 * weights, 2 * trained, 12 * trained
    layouts = {
        "DDP": (w, g, o),
        "ZeRO-2": (w, g / gpus, o / gpus),
        "ZeRO-3": (w / gpus, g / gpus, o / gpus),
        "FSDP2": (w / gpus, g / gpus, o / gpus),
    }
    return {engine: tuple(x / GIB for x in parts) + (sum(parts) / GIB,) for engine, parts in layouts.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    gpus = parser.parse_args(argv).gpus
    counts = parameter_counts()
    print("Parameters (meta device, VLTPConfig.llava15_7b_sam_vit_h()):")
    for name in ("all", "llava", "sam_side", "prune_decoder"):
        print(f"  {name:<16}{counts[name]:>15,}")
    print(
        f"  stage 1 trained {counts['stage1_trained']:>15,}  (LoRA r={LORA_R} on q_proj/v_proj {counts['lora']:,}, "
        f"text_hidden_fcs {counts['text_hidden_fcs']:,}, mask decoder {counts['mask_decoder']:,}, "
        f"[SEG]/<image> rows {counts['token_rows']:,})"
    )
    print(f"  stage 2 trained {counts['stage2_trained']:>15,}  (prune decoder + mask decoder)")
    runs = {
        "stage 1 (LoRA), whole system": (counts["all"], counts["stage1_trained"]),
        "stage 2, SAM side only": (counts["sam_side"], counts["stage2_trained"]),
        "full finetuning, whole system": (counts["all"], counts["all"]),
    }
    print(f"\nGiB per GPU on {gpus} GPUs (bf16 weights 2 B, bf16 gradients 2 B, fp32 Adam 12 B; on one GPU: DDP):")
    print(f"  {'run':<31}{'engine':<8}{'weights':>9}{'grads':>9}{'optim':>9}{'total':>9}")
    for run, (weights, trained) in runs.items():
        for engine, parts in per_gpu(weights, trained, gpus).items():
            print(f"  {run:<31}{engine:<8}" + "".join(f"{x:>9.2f}" for x in parts))


if __name__ == "__main__":
    main()
