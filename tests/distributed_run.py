"""What tests/test_distributed.py launches in several processes.

distributed_run.py train STAGE:CONFIG.yaml [STAGE:CONFIG.yaml ...] [--peft-token-rows-on-cpu]
    `vltp train` for each config in turn, in the same processes (under `accelerate launch`: DDP, DeepSpeed).
distributed_run.py fsdp2 STAGE:MODEL:DATA:OUT.safetensors [...] [--steps N]
    The Trainer's training step in a plain loop, with the model sharded by torch's `fully_shard` (accelerate
    cannot run FSDP on a CPU), for each job in turn; under `torchrun`, one sample per process and step. DATA is
    the RIO folder (stage 1) or the `[SEG]` cache (stage 2).
distributed_run.py eval MODEL WORLD OUT.json
    `evaluate_rates` on the RIO world's train split, teacher-forced at rates 0 and 0.5 and generated at 0.5, 3 rows
    per batch; process 0 writes the results to OUT.json, every process the rows LLaVA read to OUT.json.rankR; then
    `vltp eval` on the same split.
"""

import argparse
import faulthandler
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

ANSWER = "Sure, [SEG]."
LEARNING_RATE = 5e-3
ADAM_EPSILON = 1e-6  # see TOLERANCE in tests/test_distributed.py
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "accelerate"


def _token_rows_on_cpu(self, weight, rows, embed_dim):
    """peft's ZeRO-3 gathering of the trainable token rows (`TrainableTokensLayer._collect_token_weights`), with the
    receiving buffer on the weight's device instead of CUDA: rank 0 reads the rows of the gathered weight, the others
    receive them by broadcast."""
    from peft.utils.integrations import gather_params_ctx

    with gather_params_ctx([weight], modifier_rank=None):
        if dist.get_rank() == 0:
            values = weight[rows].clone()
        else:
            values = torch.empty((len(rows), embed_dim), dtype=weight.dtype, device=weight.device)
    dist.broadcast(values, src=0)
    return values


def run_configs(runs, token_rows_on_cpu: bool) -> int:
    from modeling_vltp.cli import main

    if token_rows_on_cpu:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        TrainableTokensLayer._collect_token_weights = _token_rows_on_cpu
    for run in runs:
        stage, config = run.split(":", 1)
        status = main(["train", "--stage", stage, "--config", config])
        if status:
            return status
    return 0


def wrap_classes(stage: int) -> tuple[str, ...]:
    """The layer classes the shipped FSDP config of `stage` wraps."""
    config = yaml.safe_load((EXAMPLES / f"fsdp_stage{stage}.yaml").read_text())
    return tuple(config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","))


def shard(model, stage: int) -> int:
    """`fully_shard` every layer of the stage's wrap list, then the whole model. Returns the number of layers sharded
    on their own. Classes match by exact name, as accelerate matches them: every listed class must be in the model."""
    from torch.distributed.fsdp import fully_shard

    names = wrap_classes(stage)
    present = {type(module).__name__ for module in model.modules()}
    missing = sorted(set(names) - present)
    if missing:
        raise ValueError(f"fsdp_stage{stage}.yaml wraps {missing}, which the model does not contain")
    layers = [module for module in model.modules() if type(module).__name__ in names]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return len(layers)


def build(stage: int, model_dir: str):
    """The model and what trains in it, as `train_stage1` / `train_stage2` set them up (stage 2 at rate 0.5)."""
    from transformers import set_seed

    from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor, VLTPSamModel
    from modeling_vltp.training import LoraSettings, prepare_stage1_model

    processor = VLTPProcessor.from_pretrained(model_dir)
    if stage == 1:
        model = VLTPForTaskSegmentation.from_pretrained(model_dir)
        set_seed(42)
        model = prepare_stage1_model(model, processor, LoraSettings(dropout=0.0))
        return model, processor, model.get_base_model().config
    set_seed(42)
    model = VLTPSamModel.from_pretrained(model_dir)
    model.requires_grad_(False)
    model.vision_model.prune_decoder.requires_grad_(True)
    model.mask_decoder.requires_grad_(True)
    return model, processor, model.config


def batches(stage: int, processor, data: str):
    """The training rows in file order, two per step (stage 1: the synthetic world's RIO files; stage 2: the
    `[SEG]` cache's train split), with their collator."""
    from modeling_vltp.training import DataSettings, VLTPDataCollator, load_seg_cache, load_split

    if stage == 1:
        rows = load_split(DataSettings(format="rio", annotations=data, images=data), "train")
        return rows, VLTPDataCollator(processor, [ANSWER])
    return load_seg_cache(data)["train"], VLTPDataCollator(processor)


def train_loop(stage: int, model_dir: str, data: str, steps: int, sharded: bool) -> tuple[dict, dict]:
    """`steps` AdamW steps (lr 5e-3, eps 1e-6, no weight decay, clipping at 1) of global batch 2 on the Trainer's
    loss. Sharded: process r takes sample 2s+r of step s and FSDP2 averages the gradients. Returns the full state dict
    (gathered on rank 0 when sharded) and, sharded, what was sharded: the layers sharded on their own and the share of
    the parameters' elements this process holds."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from modeling_vltp.training import STAGE1_INPUTS, STAGE1_LOSSES, STAGE2_INPUTS, STAGE2_LOSSES

    model, processor, config = build(stage, model_dir)
    rows, collate = batches(stage, processor, data)
    inputs, losses = (STAGE1_INPUTS, STAGE1_LOSSES) if stage == 1 else (STAGE2_INPUTS, STAGE2_LOSSES)
    rates = [0.0] if stage == 1 else [0.5]
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    layers = shard(model, stage) if sharded else 0
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, eps=ADAM_EPSILON, weight_decay=0)
    for step in range(steps):
        picked = [2 * step, 2 * step + 1][rank::world]
        batch = collate([rows[index] for index in picked])
        outputs = model(**{name: batch[name] for name in inputs if name in batch}, prune_rates=rates)
        loss = sum(getattr(config, f"{name}_weight") * getattr(outputs, name) for name in losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    if not sharded:
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}, {}
    local = [p.to_local().numel() for p in model.parameters()]
    facts = {
        "layers": layers,
        "parameters": len(local),
        "local_share": sum(local) / sum(p.numel() for p in model.parameters()),
    }
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)), facts


def run_fsdp2(jobs, steps: int) -> int:
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for job in jobs:
        stage, model_dir, data, out = job.split(":")
        state, facts = train_loop(int(stage), model_dir, data, steps, sharded=True)
        if dist.get_rank() == 0:
            save_file({name: tensor.contiguous() for name, tensor in state.items()}, out)
            Path(out).with_suffix(".json").write_text(json.dumps(facts))
        dist.barrier()
    dist.destroy_process_group()
    return 0


def run_eval(model_dir: str, world: str, out: str) -> int:
    from accelerate import PartialState

    from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor
    from modeling_vltp.cli import main
    from modeling_vltp.data import load_rio
    from modeling_vltp.training import distributed_process, evaluate_rates

    # Joins the gloo group, which evaluation uses; on CPUs this state itself says one process (the config's
    # `use_cpu` reaches only the Trainer's state), so the rank comes from torch.distributed.
    PartialState()
    torch.set_num_threads(1)
    model = VLTPForTaskSegmentation.from_pretrained(model_dir)
    processor = VLTPProcessor.from_pretrained(model_dir)
    dataset = load_rio(world, world, "train")
    rows, seg_embeddings = [], model.seg_embeddings
    model.seg_embeddings = lambda input_ids, *a, **k: rows.append(len(input_ids)) or seg_embeddings(input_ids, *a, **k)
    results = evaluate_rates(model, processor, dataset, [[0.0], [0.5]], batch_size=3)
    results += evaluate_rates(model, processor, dataset, [[0.5]], batch_size=3, answers="generated")
    rank = distributed_process()[0]
    Path(f"{out}.rank{rank}").write_text(json.dumps(rows))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    arguments = ["--data", "rio", "--annotations", world, "--images", world, "--split", "train"]
    return main(["eval", *arguments, "--model", model_dir, "--sweep-rates", "0,0.5", "--batch-size", "3"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("runs", nargs="+", help="STAGE:CONFIG.yaml")
    train.add_argument("--peft-token-rows-on-cpu", action="store_true")
    fsdp2 = commands.add_parser("fsdp2")
    fsdp2.add_argument("jobs", nargs="+", help="STAGE:MODEL:DATA:OUT.safetensors")
    fsdp2.add_argument("--steps", type=int, default=2)
    evaluation = commands.add_parser("eval")
    evaluation.add_argument("model")
    evaluation.add_argument("world")
    evaluation.add_argument("out")
    parser.add_argument(
        "--hang-timeout", type=float, default=240, help="dump every thread's stack and exit after this"
    )
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    if args.command == "train":
        return run_configs(args.runs, args.peft_token_rows_on_cpu)
    if args.command == "eval":
        return run_eval(args.model, args.world, args.out)
    return run_fsdp2(args.jobs, args.steps)


if __name__ == "__main__":
    sys.exit(main())
