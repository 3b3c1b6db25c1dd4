"""The engines on the CPU: 2 gloo processes train the tiny system on a small synthetic world and save the same
weights as one process with the same global batch. Stage 1: batch 1 per process against batch 2 (one answer and no
LoRA dropout, so the LM loss averages the same tokens). Stage 2 groups its batches by image: accelerate deals the
sampler's batches (of 2 rows at most, whole images, here 2 or 1 rows) in turn to the processes, so 2 processes with
batch 2 take in each step the 2 batches that one process with batch 2 accumulates over 2 steps; each averages the
two batches' mean losses. DDP, DeepSpeed ZeRO-2 and ZeRO-3 run `vltp train` under
`accelerate launch` with the shipped example configs; FSDP2 runs the Trainer's training step with torch's
`fully_shard` under `torchrun`, since accelerate cannot shard on a CPU (docs/training.md, "Engines").

Each engine runs in one launch (stage 1, then stage 2 from the one-process stage-1 model, building its own `[SEG]`
cache); a hang dumps the stacks and fails the test instead of blocking (`--hang-timeout`, subprocess timeout).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modeling_vltp import VLTPForTaskSegmentation, VLTPProcessor
from modeling_vltp.data import load_rio, synthetic
from modeling_vltp.testing import tiny_model_and_processor
from modeling_vltp.training import TrainConfig, TrainingInputError, evaluate_rates, load_seg_cache, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_run import ADAM_EPSILON, ANSWER, LEARNING_RATE, train_loop, wrap_classes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "distributed_run.py"
# Two processes sum their halves of the batch and then average the two sums; one process sums the whole batch in
# another order. In float32 that changes gradients by ~1e-7 relative. Adam divides each gradient by its running RMS,
# so a parameter whose exact gradient is zero or tiny (an attention key bias: softmax ignores a shift common to a
# query's logits) turns that rounding noise into an update of order lr * noise / (noise + eps). With eps 1e-8 this
# reached 9e-6 in stage 2; with eps 1e-6 (ADAM_EPSILON, used by every run here) the largest differences seen are
# 2.6e-7 (DDP, ZeRO-2, ZeRO-3) and 1.4e-6 (FSDP2, stage 2), against changes of about 1e-2 from training (2 steps at
# lr 5e-3). 5e-6 leaves room for other CPUs' summation orders; a process training apart would differ by ~1e-3.
TOLERANCE = 5e-6
MIN_CHANGE = 1e-3  # training must move some weight by at least this much (2 Adam steps at lr 5e-3 move ~1e-2)
LAUNCH_TIMEOUT = 420  # seconds for one launch (both stages); the helper dumps stacks after HANG_TIMEOUT
HANG_TIMEOUT = 360


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The world (6 training samples: 2 images, 3 tasks each) and the tiny system."""
    root = tmp_path_factory.mktemp("engines")
    synthetic.generate(root / "world", num_images=2, seed=0, image_size=64, format="rio", split="train")
    model, processor = tiny_model_and_processor(seed=0)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return root


def settings(root: Path, stage: int, model: Path, output: Path, batch: int, **training) -> dict:
    config = {
        "model": str(model),
        "output_dir": str(output),
        "data": {"format": "rio", "annotations": str(root / "world"), "images": str(root / "world")},
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1,
            "learning_rate": LEARNING_RATE,
            "adam_epsilon": ADAM_EPSILON,
            "warmup_steps": 0,
            "report_to": "none",
            "disable_tqdm": True,
            "save_strategy": "no",
            "logging_steps": 1000,
            **training,
        },
    }
    if stage == 1:
        # One answer for every row, empty targets too, so that the LM loss averages the same tokens whether a batch is
        # split over processes or not (answers of different lengths weigh tokens differently per process).
        config.update(lora={"dropout": 0.0}, answers=[ANSWER], empty_targets="seg")
    else:
        config.update(prune_rates=[0.5], seg_cache=str(output.parent / "seg_cache"))
    return config


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """One process, batch 2: stage 1 from the tiny system, stage 2 (2 accumulation steps) from that."""
    out = root / "one"
    train(TrainConfig.from_dict(settings(root, 1, root / "base", out / "stage1", 2, use_cpu=True), stage=1))
    stage2 = settings(root, 2, out / "stage1", out / "stage2", 2, use_cpu=True, gradient_accumulation_steps=2)
    train(TrainConfig.from_dict(stage2, stage=2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_config(name: str, path: Path) -> Path:
    """The shipped example config for 2 processes on the CPU, in float32, one accumulation step."""
    config = yaml.safe_load((ROOT / "examples" / "accelerate" / name).read_text())
    config.update(num_processes=2, mixed_precision="no", main_process_port=free_port())
    # DDP on CPUs: `use_cpu` (gloo). DeepSpeed: not `use_cpu`, which would drop DeepSpeed, but the Trainer's
    # `ddp_backend: gloo` (see ENGINES).
    config["use_cpu"] = config["distributed_type"] != "DEEPSPEED"
    if "deepspeed_config" in config:
        config["deepspeed_config"]["gradient_accumulation_steps"] = 1
    path.write_text(yaml.safe_dump(config))
    return path


def launch(command: list[str], what: str, succeed: bool = True) -> str:
    """The launch's standard output; with `succeed=False` it must fail, and its standard error is returned."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=environment, cwd=ROOT
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{what} did not finish in {LAUNCH_TIMEOUT} s: {str(error.stderr)[-3000:]}")
    assert (result.returncode == 0) == succeed, f"{what}: exit {result.returncode}:\n{result.stderr[-5000:]}"
    return result.stdout if succeed else result.stderr


# engine: (example config, `training:` settings, helper options). DeepSpeed on CPUs: without `ddp_backend: gloo`
# accelerate sees no backend and counts one process, and DeepSpeed's batch check fails. ZeRO-3: peft's ZeRO-3 code
# for trainable token rows puts its buffer on CUDA; the helper replaces that one function (see distributed_run.py).
ENGINES = {
    "ddp": ("ddp.yaml", {"use_cpu": True}, []),
    "zero2": ("deepspeed_zero2.yaml", {"use_cpu": False, "ddp_backend": "gloo"}, []),
    "zero3": ("deepspeed_zero3.yaml", {"use_cpu": False, "ddp_backend": "gloo"}, ["--peft-token-rows-on-cpu"]),
}


@pytest.fixture(scope="module")
def engine_runs(root, reference):
    """Launch an engine once (both stages) when a test first asks for it; its folder, with `printed` output."""
    done = {}

    def run(engine: str) -> Path:
        if engine not in done:
            if engine != "ddp":
                pytest.importorskip("deepspeed")
            example, training, options = ENGINES[engine]
            out = root / engine
            out.mkdir()
            runs = []
            for stage, model in ((1, root / "base"), (2, reference / "stage1")):
                batch = 1 if stage == 1 else 2  # per process (see the module's docstring)
                config = settings(root, stage, model, out / f"stage{stage}", batch, **training)
                path = out / f"stage{stage}.yaml"
                path.write_text(yaml.safe_dump(config))
                runs.append(f"{stage}:{path}")
            launcher = [sys.executable, "-m", "accelerate.commands.launch"]
            launcher += ["--config_file", str(accelerate_config(example, out / "accelerate.yaml"))]
            command = [*launcher, str(HELPER), "--hang-timeout", str(HANG_TIMEOUT), "train", *runs, *options]
            (out / "printed").write_text(launch(command, engine))
            done[engine] = out
        return done[engine]

    return run


def saved(folder: Path) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_trained_alike(result: dict, expected: dict, start: dict):
    assert result.keys() == expected.keys()
    change = max((expected[name] - start[name]).abs().max().item() for name in expected if name in start)
    assert change > MIN_CHANGE, f"the one-process run barely trained: largest change {change}"
    torch.testing.assert_close(result, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_engine_saves_what_one_process_saves_in_both_stages(engine, engine_runs, root, reference):
    out = engine_runs(engine)
    printed = (out / "printed").read_text()
    assert "stage 1 done" in printed and "stage 2 done" in printed
    assert printed.count("on 2 processes: 2 steps") == 2, printed  # not silently one process
    assert_trained_alike(saved(out / "stage1"), saved(reference / "stage1"), saved(root / "base"))
    assert_trained_alike(saved(out / "stage2"), saved(reference / "stage2"), saved(reference / "stage1"))
    # The [SEG] cache, built by the main process outside DeepSpeed, holds the one-process values.
    cache, expected = load_seg_cache(out / "seg_cache"), load_seg_cache(reference / "seg_cache")
    torch.testing.assert_close(
        torch.tensor(cache["train"]["seg_embed"]), torch.tensor(expected["train"]["seg_embed"]), rtol=0, atol=1e-6
    )


@pytest.fixture(scope="module")
def fsdp2_run(root, reference) -> Path:
    """torchrun, 2 processes: stage 1 from the tiny system and stage 2 (rate 0.5, the pruned path) from the
    one-process stage-1 model and its cache, each sharded with `fully_shard` per the shipped FSDP wrap lists."""
    out = root / "fsdp2"
    out.mkdir()
    jobs = [
        f"1:{root / 'base'}:{root / 'world'}:{out / 'stage1.safetensors'}",
        f"2:{reference / 'stage1'}:{reference / 'seg_cache'}:{out / 'stage2.safetensors'}",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), str(HELPER), "--hang-timeout", str(HANG_TIMEOUT), "fsdp2", *jobs]
    launch(command, "fsdp2")
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_fsdp2_sharded_training_matches_one_process(stage, fsdp2_run, root, reference):
    model, data = (root / "base", root / "world") if stage == 1 else (reference / "stage1", reference / "seg_cache")
    expected, _ = train_loop(stage, str(model), str(data), steps=2, sharded=False)
    result = load_file(fsdp2_run / f"stage{stage}.safetensors")
    start, _ = train_loop(stage, str(model), str(data), steps=0, sharded=False)
    assert_trained_alike(result, expected, start)
    facts = json.loads((fsdp2_run / f"stage{stage}.json").read_text())
    # Really sharded: every wrapped layer on its own, each process holding about half of every parameter.
    assert len(wrap_classes(stage)) == (4 if stage == 1 else 2)
    assert facts["layers"] >= (8 if stage == 1 else 5), facts  # tiny system: 2 Llama + 2 CLIP + 4 SAM layers, ...
    assert 0.45 < facts["local_share"] < 0.55, facts


def test_evaluation_is_data_parallel_and_gives_one_process_metrics(root):
    """`accelerate launch` (DDP config, 2 processes): each process evaluates one of the 2 images (batches of 3 rows
    hold whole images), the pixel counts are gathered, and the metrics equal one process's exactly (the batches are
    the same, so are their computations); `vltp eval` prints one table."""
    out = root / "eval"
    out.mkdir()
    config = accelerate_config("ddp.yaml", out / "accelerate.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(HELPER)]
    command += ["--hang-timeout", str(HANG_TIMEOUT), "eval", str(root / "base"), str(root / "world"), str(out / "r")]
    printed = launch(command, "eval")
    assert [json.loads((out / f"r.rank{rank}").read_text()) for rank in (0, 1)] == [[3], [3]]
    model = VLTPForTaskSegmentation.from_pretrained(root / "base")
    processor = VLTPProcessor.from_pretrained(root / "base")
    dataset = load_rio(str(root / "world"), str(root / "world"), "train")
    expected = evaluate_rates(model, processor, dataset, [[0.0], [0.5]], batch_size=3)
    expected += evaluate_rates(model, processor, dataset, [[0.5]], batch_size=3, answers="generated")
    assert json.loads((out / "r").read_text()) == json.loads(json.dumps(expected))
    assert printed.count("RIO train: 6 samples") == 1 and printed.count("pruning rate") == 1, printed


def test_a_launch_whose_engine_would_not_run_is_refused_before_anything_is_written(root, tmp_path, monkeypatch):
    """On CPUs accelerate never runs FSDP. One process with the variable `accelerate launch` sets for an FSDP config
    (as it sets it for one process): accelerate's own state is not FSDP, and training refuses. Two processes from the
    shipped FSDP config without `use_cpu` (gloo): the Trainer would see one process and no gradient exchange while
    two train; both refuse."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    config = settings(root, 1, root / "base", tmp_path / "out", 1, use_cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert Accelerator(cpu=True).state.distributed_type is not DistributedType.FSDP
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(TrainingInputError, match=r"^the launch asked for FSDP, but distributed_type NO on 1 process"):
        train(TrainConfig.from_dict(config, stage=1))
    assert not (tmp_path / "out").exists()

    path = accelerate_config("fsdp_stage1.yaml", tmp_path / "accelerate.yaml")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "use_cpu": False}))
    config = settings(root, 1, root / "base", tmp_path / "out", 1, use_cpu=False, ddp_backend="gloo")
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), str(HELPER)]
    errors = launch([*command, "train", f"1:{tmp_path / 'stage1.yaml'}"], "fsdp on gloo", succeed=False)
    refusal = (
        "vltp: error: the launch asked for FSDP and 2 processes exchanging gradients, but 2 processes each training "
        "its own copy (distributed_type NO: no gradient exchange) would run"
    )
    assert errors.count(refusal) == 2, errors[-3000:]
    assert not (tmp_path / "out").exists()
