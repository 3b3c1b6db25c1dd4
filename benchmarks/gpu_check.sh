#!/usr/bin/env bash
# One GPU check (about 10 minutes on an H100/H200), for the first time a GPU machine is lent. Installs nothing.
#   1. SAM ViT-H alone: transformers' dense SamVisionModel against VLTP pruned at 0.5 and 0.8, eager (bench_vision.py)
#      and compiled (torch.compile, below), bf16, batch 1, 1024 px.
#   2. The whole system at LLaVA-1.5-7B + SAM ViT-H shapes, random weights, 1 and 8 tasks per image, shared against
#      unshared (bench_system.py --system paper), eager and with SAM's ViT compiled; pruning at 0.5 and 0.8.
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; prints Markdown tables)
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"

echo "## 1a. ViT-H encoder, eager"
timeout 90 $PYTHON benchmarks/bench_vision.py --variant vit_h --device cuda --dtype bf16 --rates 0.5,0.8 --runs 10

echo "## 1b. ViT-H encoder, torch.compile"
timeout 180 $PYTHON - <<'PY'
import statistics
import sys
import time

import torch
from transformers import SamVisionConfig, SamVisionModel

sys.path.insert(0, "benchmarks")
from bench_vision import randomize_

from modeling_vltp import VLTPSamVisionModel, VLTPVisionConfig

config = VLTPVisionConfig.vit_h()
ours = randomize_(VLTPSamVisionModel(config)).to("cuda", torch.bfloat16).eval()
fields = {k: v for k, v in config.to_dict().items() if k in SamVisionConfig.__dataclass_fields__}
sam = SamVisionModel(SamVisionConfig(**fields)).eval()
sam.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith("vision_encoder.")})
sam = sam.to("cuda", torch.bfloat16)
pixels = torch.randn(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
guidance = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
compiled_sam, compiled_ours = torch.compile(sam), torch.compile(ours, fullgraph=True)
variants = {
    "transformers SamVisionModel compiled": (compiled_sam, {}),
    "ours dense compiled": (compiled_ours, {}),
    "ours r=0.5 compiled": (compiled_ours, {"guidance_embeds": guidance, "prune_rates": [0.5, 0.5]}),
    "ours r=0.8 compiled": (compiled_ours, {"guidance_embeds": guidance, "prune_rates": [0.8, 0.8]}),
}
times = {name: [] for name in variants}
with torch.inference_mode():
    for round_index in range(11):  # round 0 compiles
        names = list(variants)[round_index % 4 :] + list(variants)[: round_index % 4]
        for name in names:
            model, kwargs = variants[name]
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(pixels, **kwargs)
            torch.cuda.synchronize()
            if round_index:
                times[name].append((time.perf_counter() - start) * 1000)
print("| variant (bf16, 1024 px, batch 1) | median ms |")
print("|---|---|")
for name, values in times.items():
    print(f"| {name} | {statistics.median(values):.2f} |")
PY

echo "## 2. Whole system, LLaVA-1.5-7B + SAM ViT-H, random weights"
for rate in 0.5 0.8; do
  timeout 100 $PYTHON benchmarks/bench_system.py --system paper --device cuda --dtype bf16 --tasks 1,8 --runs 5 \
    --rate $rate --skip-macs
done
timeout 120 $PYTHON benchmarks/bench_system.py --system paper --device cuda --dtype bf16 --tasks 1,8 --runs 5 \
  --rate 0.8 --skip-macs --compile
