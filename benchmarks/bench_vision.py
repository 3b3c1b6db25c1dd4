"""Speed of VLTP's pruned SAM image encoder, side by side with transformers' `SamVisionModel`.

One run times, interleaved round by round (in a rotating order) so that drift hits every variant alike:
  transformers' SamVisionModel (dense), our model without guidance (dense), and ours pruned at each rate given.
It prints the GMACs of each variant (`count_gmacs`), the median milliseconds, the speedup over our dense run, and that
speedup divided by the MAC-ideal speedup (dense GMACs / pruned GMACs).

    python benchmarks/bench_vision.py                                  # CPU: ViT-B, fp32, 1024x1024
    python benchmarks/bench_vision.py --variant vit_h --device cuda --dtype bf16
    python benchmarks/bench_vision.py --variant vit_h --device cuda --dtype fp32

Weights are random (normal, std 0.02; SAM's own 1e-10 init would time denormal arithmetic on the CPU); the timing does
not depend on them because the kept-token count is fixed per stage.
"""

import argparse
import platform
import statistics
import time

import torch
import transformers
from transformers import SamVisionConfig, SamVisionModel

from modeling_vltp import VLTPSamVisionModel, VLTPVisionConfig, count_gmacs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--rates", default="0.5,0.8", help="comma-separated rates, used for every stage")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rates = [float(r) for r in args.rates.split(",")]

    config = getattr(VLTPVisionConfig, args.variant)()
    ours = randomize_(VLTPSamVisionModel(config)).to(device, dtype).eval()
    sam_fields = {k: v for k, v in config.to_dict().items() if k in SamVisionConfig.__dataclass_fields__}
    sam = SamVisionModel(SamVisionConfig(**sam_fields)).eval()
    sam.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith("vision_encoder.")})
    sam = sam.to(device, dtype)

    size = config.image_size
    pixel_values = torch.randn(args.batch_size, 3, size, size, device=device, dtype=dtype)
    guidance = torch.randn(args.batch_size, config.guidance_dim, device=device, dtype=dtype)
    stages = len(config.prune_layers)
    variants = {"transformers SamVisionModel": (sam, {}), "ours dense": (ours, {})}
    for rate in rates:
        variants[f"ours r={rate}"] = (ours, {"guidance_embeds": guidance, "prune_rates": [rate] * stages})

    with torch.device("meta"):
        meta_model = VLTPSamVisionModel(config)
        meta_pixels = torch.empty(1, 3, size, size)
        meta_guidance = torch.empty(1, config.guidance_dim)
    gmacs = {}
    for name, (_, kwargs) in variants.items():
        meta_kwargs = {k: (meta_guidance if k == "guidance_embeds" else v) for k, v in kwargs.items()}
        gmacs[name] = count_gmacs(meta_model, meta_pixels, **meta_kwargs) * args.batch_size

    times = {name: [] for name in variants}
    names = list(variants)
    with torch.inference_mode():
        for round_index in range(args.runs + 1):
            # rotate the order every round, so that no variant always runs right after the same one
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                model, kwargs = variants[name]
                synchronize(device)
                start = time.perf_counter()
                model(pixel_values, **kwargs)
                synchronize(device)
                if round_index > 0:  # the first round warms up
                    times[name].append((time.perf_counter() - start) * 1000)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(
        f"{args.variant} {args.dtype} {size}x{size} batch {args.batch_size}, {device.type} ({machine}), "
        f"{torch.get_num_threads()} threads, median of {args.runs}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print("| variant | GMACs | median ms | speedup vs ours dense | speedup / MAC-ideal |")
    print("|---|---|---|---|---|")
    dense_ms, dense_gmacs = statistics.median(times["ours dense"]), gmacs["ours dense"]
    for name in variants:
        ms = statistics.median(times[name])
        speedup, ideal = dense_ms / ms, dense_gmacs / gmacs[name]
        print(f"| {name} | {gmacs[name]:.1f} | {ms:.1f} | {speedup:.2f}x | {speedup / ideal:.2f} |")


if __name__ == "__main__":
    main()
