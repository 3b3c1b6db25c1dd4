"""Our multiply-accumulate counts next to the paper's "GFLOPs" (which are MACs), at 1024x1024, batch 1.

Counted with `count_gmacs` on the meta device (no compute, no memory), for the pruning positions and rates of the
paper's Tables 4, 5, 6 and 8 (positions are 1-based layer numbers: a stage starts after that layer).

    python benchmarks/gmacs_paper.py
"""

import torch

from modeling_vltp import VLTPSamVisionModel, VLTPVisionConfig, count_gmacs

# (variant, prune layers, rates, the paper's figure, where it is from)
PAPER_FIGURES = [
    ("vit_h", [], [], 2976, "Table 3/5/8 baseline"),
    ("vit_h", [8], [0.2], 2529, "Table 5"),
    ("vit_h", [8], [0.4], 2083, "Table 5"),
    ("vit_h", [8, 16], [0.2, 0.4], 2232, "Table 5"),
    ("vit_h", [8, 16], [0.2, 0.6], 1783, "Table 5"),
    ("vit_h", [16], [0.5], 2221, "Table 6"),
    ("vit_h", [16], [0.7], 1923, "Table 6"),
    ("vit_h", [16], [0.8], 1775, "Table 6"),
    ("vit_h", [16, 24], [0.5, 0.5], 2227, "Tables 3-6, 8"),
    ("vit_h", [16, 24], [0.7, 0.7], 1930, "Tables 4, 6"),
    ("vit_h", [16, 24], [0.8, 0.8], 1782, "Tables 4-6, 8"),
    ("vit_h", [16, 24], [0.9, 0.9], 1636, "Table 4"),
    ("vit_h", [8, 16, 24], [0.2, 0.4, 0.4], 2232, "Table 5"),
    ("vit_h", [8, 16, 24], [0.2, 0.4, 0.6], 1853, "Table 5"),
    ("vit_h", [8, 16, 24], [0.5, 0.5, 0.5], 1860, "Table 5"),
    ("vit_l", [], [], 1491, "Table 8 baseline"),
    ("vit_l", [12, 18], [0.5, 0.5], 1118, "Table 8"),
    ("vit_l", [12, 18], [0.8, 0.8], 895, "Table 8"),
]


def main():
    print("| ViT | prune after | rates | ours GMACs | paper | difference | source |")
    print("|---|---|---|---|---|---|---|")
    for variant, layers, rates, paper, source in PAPER_FIGURES:
        with torch.device("meta"):
            model = VLTPSamVisionModel(getattr(VLTPVisionConfig, variant)(prune_layers=layers, prune_rates=rates))
            pixel_values = torch.empty(1, 3, 1024, 1024)
            guidance = torch.empty(1, model.config.guidance_dim) if layers else None
        gmacs = count_gmacs(model, pixel_values, guidance_embeds=guidance)
        print(
            f"| {variant[-1].upper()} | {layers or '-'} | {rates or '-'} | {gmacs:.1f} | {paper} | "
            f"{100 * (gmacs / paper - 1):+.1f}% | {source} |"
        )


if __name__ == "__main__":
    main()
