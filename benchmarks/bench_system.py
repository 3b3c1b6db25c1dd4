"""Cost of several tasks on one image: the whole VLTP system, sharing the image work (default) against not sharing it.

Three parts, all printed as Markdown tables:

1. Time per (image, task) of `VLTPForTaskSegmentation.segment` for 1, 2, 4, 8 and 14 tasks on one image, with
   `share_image_work=True` and `False`; per task count, median of `--runs` rounds after a warm-up round, shared and
   unshared alternating in order; a row is printed as soon as it is measured. The "x one task" columns compare rows
   measured one after the other. The system is random and forced to answer "[SEG]" and end (a logits processor), so
   every task runs the whole pipeline: CLIP, LLaVA prefill and generation, SAM's ViT (pruned), mask decoder.
   `--system mid` (CPU default): CLIP 224 px (6 layers, 512 wide), a 6-layer 512-wide Llama, a 12-layer 384-wide SAM
   ViT at 512 px pruned after layers 6 and 9 at 0.8. `--system paper`: LLaVA-1.5-7B + SAM ViT-H at 1024 px, pruned
   after layers 16 and 24 at `--rate` (for a GPU).
2. Peak memory of one call per variant, in the warm-up round: CUDA `max_memory_allocated`; CPU the process's peak
   resident set (VmHWM, reset before each call through /proc/self/clear_refs), model weights included.
3. Multiply-accumulates (GMACs, fvcore convention) per stage at LLaVA-1.5-7B + SAM ViT-H shapes on the meta device,
   for 1 and 8 tasks, shared and unshared. Text lengths are assumptions stated in the table's title. Then the
   break-even by question length: 8 tasks over one task (shared) for questions of 16 to 48 tokens, and the longest
   question for which 8 tasks cost at most 2x one task, at rates 0.5 and 0.8.

    OMP_NUM_THREADS=2 python benchmarks/bench_system.py                    # CPU, mid-size system, fp32
    python benchmarks/bench_system.py --skip-timing                        # the MAC tables only (meta device)
    python benchmarks/bench_system.py --system paper --device cuda --dtype bf16 --tasks 1,8
"""

import argparse
import datetime
import functools
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import LlavaConfig, LogitsProcessor, LogitsProcessorList

from modeling_vltp import VLTPConfig, VLTPForTaskSegmentation, VLTPVisionConfig
from modeling_vltp.flops import count_call_gmacs, count_gmacs
from modeling_vltp.testing import tiny_processor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASKS = [
    f"you can use the thing to {verb}"
    for verb in (
        "step on to reach a high shelf",
        "sit comfortably",
        "place flowers in",
        "get potatoes out of the fire",
        "water a plant",
        "get lemon out of tea",
        "dig a hole",
        "open a bottle of beer",
        "open a parcel",
        "serve wine",
        "pour a drink",
        "pound carpet",
        "extinguish a fire",
        "cut the food on the table",
    )
]
# Text lengths assumed for the MAC count at LLaVA-1.5-7B shapes (LLaMA tokenizer): BOS + "USER: " before the 576
# image tokens; "\n<task> Please output segmentation mask. ASSISTANT:" after them; the answer "Sure, [SEG]." + EOS.
PREFIX_TEXT_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS = 4, 32, 6
# Question lengths of the break-even table, and the ratio of 8 tasks to one task it is about (issue 10's target).
BREAK_EVEN_QUESTION_TOKENS, BREAK_EVEN_TASKS, TARGET_RATIO = (16, 24, 32, 48), 8, 2.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", default="mid", choices=["mid", "paper"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--tasks", default="1,2,4,8,14", help="comma-separated numbers of tasks on one image")
    parser.add_argument("--rate", type=float, default=None, help="pruning rate of every stage (default: 0.8 mid)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--compile", action="store_true", help="torch.compile SAM's pruned ViT")
    parser.add_argument("--skip-macs", action="store_true")
    parser.add_argument("--skip-timing", action="store_true", help="no timing (and no model built): MACs only")
    return parser.parse_args()


class ForceAnswerSeg(LogitsProcessor):
    """Make every row answer "[SEG]" and then end: a random system then runs the whole pipeline for each task."""

    def __init__(self, seg_token_id: int, eos_token_id: int):
        self.seg_token_id, self.eos_token_id = seg_token_id, eos_token_id

    def __call__(self, input_ids, scores):
        after_seg = input_ids[:, -1] == self.seg_token_id
        token = torch.where(after_seg, self.eos_token_id, self.seg_token_id)
        return torch.full_like(scores, -float("inf")).scatter(1, token[:, None], 0.0)


def mid_system(rate: float):
    """The mid-size random system of issue 10 and the processor it fits (CLIP 224 px with 14 px patches: 256 image
    tokens; SAM at 512 px: a 32x32 grid)."""
    processor = tiny_processor(sam_image_size=512, clip_image_size=224, clip_patch_size=14)
    tokenizer = processor.tokenizer
    llava_config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "image_size": 224,
            "patch_size": 14,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=processor.image_token_id,
        image_seq_length=processor.num_image_tokens,
    )
    vision_config = VLTPVisionConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_dim=1536,
        image_size=512,
        global_attn_indexes=[2, 5, 8, 11],
        prune_layers=[6, 9],
        prune_rates=[rate, rate],
    )
    config = VLTPConfig(
        llava_config=llava_config,
        vision_config=vision_config,
        prompt_encoder_config={"image_size": 512},
        seg_token_id=processor.seg_token_id,
    )
    return config, processor


def paper_system(rate: float):
    """LLaVA-1.5-7B + SAM ViT-H at the paper's shapes; the prompt's text from the tiny tokenizer, 576 image tokens."""
    processor = tiny_processor(sam_image_size=1024, clip_image_size=336, clip_patch_size=14)
    config = VLTPConfig.llava15_7b_sam_vit_h(seg_token_id=processor.seg_token_id)
    config.llava_config.image_token_id = processor.image_token_id
    config.vision_config.prune_rates = [rate] * len(config.vision_config.prune_layers)
    return config, processor


def build_model(config, device, dtype) -> VLTPForTaskSegmentation:
    """A random model built on `device`; SAM's ViT weights drawn with std 0.02 (SAM's 1e-10 init would time denormal
    arithmetic on a CPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = VLTPForTaskSegmentation(config)
    with torch.no_grad():
        for parameter in model.vision_model.vision_encoder.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(call, device: torch.device) -> float:
    """Peak memory of `call()`: CUDA `max_memory_allocated`, else the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        call()
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        call()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    call()  # no /proc: the process's peak so far (a lower bound of nothing better)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_segment(model, processor, image, num_tasks, runs, device):
    """Median seconds and peak MiB of `segment` on `num_tasks` tasks, shared and unshared (keys True, False)."""
    force = LogitsProcessorList([ForceAnswerSeg(processor.seg_token_id, processor.tokenizer.eos_token_id)])

    def call(share):
        results = model.segment(
            image, TASKS[:num_tasks], processor, max_new_tokens=4, share_image_work=share, logits_processor=force
        )
        assert all(r.seg_found for r in results)

    variants = [True, False]
    times = {share: [] for share in variants}
    with torch.inference_mode():
        # the first round warms up (and compiles), and measures peak memory
        memory = {share: peak_memory_mib(lambda: call(share), device) for share in variants}
        for round_index in range(1, runs + 1):
            for share in variants[round_index % 2 :] + variants[: round_index % 2]:  # alternate the order
                synchronize(device)
                start = time.perf_counter()
                call(share)
                synchronize(device)
                times[share].append(time.perf_counter() - start)
    return {share: statistics.median(values) for share, values in times.items()}, memory


def stage_gmacs(
    model, num_tasks: int, share: bool, rate: float, question_tokens: int = QUESTION_TOKENS
) -> dict[str, float]:
    """GMACs per stage of `segment` for `num_tasks` tasks on one image, `model` on the meta device, every pruning
    stage at `rate`, each question `question_tokens` long."""
    images = 1 if share else num_tasks
    clip, prefix_one, per_task, decoder_per_task = image_gmacs(model, rate)
    return {
        "CLIP + projector": clip * images,
        **text_gmacs(model, num_tasks, share, question_tokens),
        "SAM prefix (dense layers)": prefix_one * images,
        "SAM pruned suffix + neck": per_task * num_tasks,
        "prompt encoder + mask decoder": decoder_per_task * num_tasks,
    }


def text_gmacs(model, num_tasks: int, share: bool, question_tokens: int) -> dict[str, float]:
    """GMACs of LLaVA's language model (prefill of the prompt, generation of the answer) and of `text_hidden_fcs` for
    `num_tasks` tasks on one image."""
    llava, text = model.llava, model.config.get_text_config()
    vision_config = model.config.llava_config.vision_config
    prefix = PREFIX_TEXT_TOKENS + (vision_config.image_size // vision_config.patch_size) ** 2

    def embeds(rows, length):
        return torch.empty(rows, length, text.hidden_size, device="meta")

    def prefill(rows, length, cache=None):
        """The language model over `length` new positions (after `cache`), and the LM head at the last one."""
        output = llava.model.language_model(inputs_embeds=embeds(rows, length), cache=cache, use_cache=True)
        llava.lm_head(output.last_hidden_state[:, -1:])
        return output.cache

    gmacs = {}
    if share:
        cache = prefill(1, prefix)
        gmacs["LLaVA prefill"] = count_call_gmacs(prefill, 1, prefix)
        cache.batch_repeat_interleave(num_tasks)
        gmacs["LLaVA prefill"] += count_call_gmacs(prefill, num_tasks, question_tokens, cache)
    else:
        cache = prefill(num_tasks, prefix + question_tokens)
        gmacs["LLaVA prefill"] = count_call_gmacs(prefill, num_tasks, prefix + question_tokens)
    gmacs["generation"] = 0.0
    for _ in range(ANSWER_TOKENS - 1):
        gmacs["generation"] += count_call_gmacs(prefill, num_tasks, 1, cache)
        prefill(num_tasks, 1, cache)
    gmacs["text_hidden_fcs"] = count_call_gmacs(model.text_hidden_fcs, embeds(num_tasks, 1))
    return gmacs


@functools.cache
def image_gmacs(model, rate: float) -> tuple[float, float, float, float]:
    """GMACs of the work on one image that does not depend on the text, every pruning stage at `rate`: CLIP and the
    projector, SAM's dense prefix, and per task the pruned stages with the neck and the prompt encoder with the mask
    decoder. Cached: the break-even table asks for the same rate at every question length."""
    rates = [rate] * len(model.config.vision_config.prune_layers)
    clip_size = model.config.llava_config.vision_config.image_size
    vision_config = model.config.vision_config
    with torch.device("meta"):
        clip_pixels = torch.empty(1, 3, clip_size, clip_size)
        sam_pixels = torch.empty(1, 3, vision_config.image_size, vision_config.image_size)
        guidance = torch.empty(1, vision_config.guidance_dim)
    clip = count_call_gmacs(model.llava.model.get_image_features, pixel_values=clip_pixels)

    encoder = model.vision_model.vision_encoder
    dense_layers = encoder.layers[: vision_config.prune_layers[0]]

    def sam_prefix(pixel_values):
        hidden = encoder.patch_embed(pixel_values) + encoder.pos_embed
        for layer in dense_layers:
            hidden = layer(hidden)

    prefix_one = count_call_gmacs(sam_prefix, sam_pixels)
    # The pruned stages and the neck per task: the whole pruned ViT of one image and one task, less its prefix.
    per_task = count_gmacs(model.vision_model, sam_pixels, guidance_embeds=guidance, prune_rates=rates) - prefix_one
    decode = count_call_gmacs(model.decode_masks, sam_pixels, guidance, rates)
    return clip, prefix_one, per_task, decode - per_task - prefix_one


def meta_paper_model() -> VLTPForTaskSegmentation:
    """LLaVA-1.5-7B + SAM ViT-H on the meta device, for counting."""
    with torch.device("meta"):
        # without gradients: torch's module tracker fails on outputs that are parameters themselves
        return VLTPForTaskSegmentation(VLTPConfig.llava15_7b_sam_vit_h()).requires_grad_(False)


def print_macs(model, rate: float):
    print(
        f"\nGMACs per stage at LLaVA-1.5-7B + SAM ViT-H (1024 px, pruned after layers 16 and 24 at {rate}), meta "
        f"device; prompt = {PREFIX_TEXT_TOKENS} text + 576 image tokens + {QUESTION_TOKENS} question tokens, "
        f"{ANSWER_TOKENS} answer tokens"
    )
    columns = [(1, True), (1, False), (8, True), (8, False)]
    table = {column: stage_gmacs(model, *column, rate) for column in columns}
    names = list(table[columns[0]])
    header = " | ".join(f"{n} task{'s' if n > 1 else ''} {'shared' if s else 'unshared'}" for n, s in columns)
    print(f"| stage | {header} |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{table[column][name]:.1f}" for column in columns) + " |")
    totals = {column: sum(table[column].values()) for column in columns}
    print("| **total** | " + " | ".join(f"**{totals[column]:.1f}**" for column in columns) + " |")
    for share in (True, False):
        print(f"8 tasks / 1 task, {'shared' if share else 'unshared'}: {totals[(8, share)] / totals[(1, share)]:.2f}x")


def shared_task_ratio(model, rate: float, question_tokens: int) -> float:
    """MACs of `BREAK_EVEN_TASKS` tasks on one image over those of one task, sharing the image work."""
    many, one = (sum(stage_gmacs(model, n, True, rate, question_tokens).values()) for n in (BREAK_EVEN_TASKS, 1))
    return many / one


def longest_question_within_target(model, rate: float, limit: int = 1024) -> int:
    """The longest question (in tokens, at most `limit`) for which `BREAK_EVEN_TASKS` tasks cost at most
    `TARGET_RATIO` times one task; 0 when none does. The ratio grows with the question's length (each task adds its
    question, the image work is shared), so bisection finds it."""
    within, beyond = 0, limit + 1
    while beyond - within > 1:
        middle = (within + beyond) // 2
        if shared_task_ratio(model, rate, middle) <= TARGET_RATIO:
            within = middle
        else:
            beyond = middle
    return within


def print_break_even(model, rates=(0.5, 0.8)):
    print(
        f"\n{BREAK_EVEN_TASKS} tasks / 1 task (shared) by question length, LLaVA-1.5-7B + SAM ViT-H, meta device; "
        f"prompt = {PREFIX_TEXT_TOKENS} text + 576 image tokens + the question, {ANSWER_TOKENS} answer tokens"
    )
    print("| question tokens | " + " | ".join(f"rate {rate}" for rate in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for length in BREAK_EVEN_QUESTION_TOKENS:
        ratios = [shared_task_ratio(model, rate, length) for rate in rates]
        print(f"| {length} | " + " | ".join(f"{ratio:.2f}x" for ratio in ratios) + " |")
    longest = [longest_question_within_target(model, rate) for rate in rates]
    print(
        f"| longest within {TARGET_RATIO:g}x | " + " | ".join(f"{length} tokens" for length in longest) + " |",
        flush=True,
    )


def print_timing(args):
    """Parts 1 and 2: time and peak memory of `segment` per number of tasks, shared and unshared."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rate = args.rate if args.rate is not None else (0.8 if args.system == "mid" else 0.5)
    config, processor = (mid_system if args.system == "mid" else paper_system)(rate)
    model = build_model(config, device, dtype)
    if args.compile:
        model.vision_model.compile()
    counts = [int(n) for n in args.tasks.split(",")]
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(480, 640, 3, generator=generator) * 255).to(torch.uint8).numpy()

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(
        f"{args.system} system, rate {rate}, {args.dtype}, {device.type} ({machine}), {torch.get_num_threads()} "
        f"threads{', SAM ViT compiled' if args.compile else ''}; median of {args.runs} rounds (shared and unshared "
        f"alternating); {datetime.date.today()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        "| tasks on the image | shared ms / task | unshared ms / task | shared: x one task | unshared: x one task "
        "| peak MiB shared | peak MiB unshared |"
    )
    print("|---|---|---|---|---|---|---|", flush=True)
    first = None
    for n in counts:
        medians, memory = time_segment(model, processor, image, n, args.runs, device)
        first = first or medians
        print(
            f"| {n} | {medians[True] / n * 1000:.0f} | {medians[False] / n * 1000:.0f} "
            f"| {medians[True] / first[True]:.2f} | {medians[False] / first[False]:.2f} "
            f"| {memory[True]:.0f} | {memory[False]:.0f} |",
            flush=True,
        )


def main():
    args = parse_args()
    if not args.skip_timing:
        print_timing(args)
    if not args.skip_macs:
        print(f"MACs: {datetime.date.today()}, torch {torch.__version__}, transformers {transformers.__version__}")
        model = meta_paper_model()
        for mac_rate in (0.5, 0.8):
            print_macs(model, mac_rate)
        print_break_even(model)


if __name__ == "__main__":
    main()
