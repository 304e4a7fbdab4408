"""DDP and FSDP on 2 CPU processes (gloo) train on the global batches of one process and match it; sharded
checkpoints resume on 2 and on 1 process, and a single-file checkpoint of 1 process resumes on 2.

One group of 2 processes runs every distributed part (process start-up dominates the time):
  ddp      4 steps, DDP, head-only EMA teacher;
  fsdp     FSDP with a full EMA teacher, gradient accumulation and activation checkpointing: 2 steps,
           checkpoint (last.dcp), then a second Trainer resumes it to step 4 (interrupted + resumed on 2)
           and evaluates the gathered model;
  from_one FSDP resuming the step-2 last.pt of one process to step 4 (1 -> 2);
  meta     FSDP with meta-device initialisation and the bf16 policy, 1 step;
  ddp_bf16_weights  DDP on bf16 compute weights (loop.bf16_mode=weights), 4 steps;
  fsdp_bf16_weights FSDP with loop.bf16_mode=weights (its bf16 policy, no autocast), 1 step.
The parent process runs the one-process references and resumes the FSDP step-2 checkpoint alone (2 -> 1).
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

import tipstorch
from tests.train.loop_helpers import losses, tiny_cfg
from tipstorch.models.text import sinusoidal_positions
from tipstorch.train.loop import Trainer
from tipstorch.train.run_state import load_checkpoint
from tipstorch.weights.factory import get_tokenizer

WORLD = 2
STEPS, HALF = 4, 2
COMMON = (f"loop.steps={STEPS}", "loop.batch_size=8", f"loop.checkpoint_every={HALF}")
DDP = ("loop.parallel=ddp",)
BF16_WEIGHTS = ("loop.bf16=true", "loop.bf16_mode=weights")
FSDP = ("loop.parallel=fsdp", "teacher.mode=full", "loop.accumulation_steps=2", "model.grad_checkpointing=true")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def whole_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights of a (possibly FSDP) module, on every rank."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    return {name: value.detach().clone() for name, value in state.items()}


def record(trainer: Trainer, history: list[dict[str, float]]) -> dict:
    return {"student": whole_state(trainer.student), "teacher": whole_state(trainer.teacher),
            "losses": losses(history)}


def weight_sum(model: torch.nn.Module, tokenizer) -> dict[str, float]:
    """An "evaluation" that names the weights it was given: their sum (float64)."""
    return {"weight_sum": sum(float(value.double().sum()) for value in model.state_dict().values())}


def run_rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    folder = Path(folder)
    results = {}
    ddp = Trainer(tiny_cfg(*COMMON, *DDP), get_tokenizer, out_dir=folder / "ddp")
    assert (ddp.context.rank, ddp.context.world_size, ddp.local_batch) == (rank, WORLD, 4)
    results["ddp"] = record(ddp, ddp.fit().history)
    first = Trainer(tiny_cfg(*COMMON, *FSDP), get_tokenizer, out_dir=folder / "fsdp")
    first_half = first.fit(_first(first, HALF)).history
    state, _ = load_checkpoint(folder / "fsdp")
    second = Trainer(tiny_cfg(*COMMON, *FSDP), get_tokenizer, out_dir=folder / "fsdp", resume=state,
                     evaluate=weight_sum)
    second_result = second.fit()
    results["fsdp"] = record(second, first_half + second_result.history) | {"eval_after": second_result.eval_after}
    state, _ = load_checkpoint(folder / "one")
    from_one = Trainer(tiny_cfg(*COMMON, *FSDP), get_tokenizer, out_dir=folder / "from_one", resume=state)
    results["from_one"] = record(from_one, from_one.fit().history)
    results["meta"] = meta_run(folder)
    ddp_bf16 = Trainer(tiny_cfg(*COMMON, *DDP, *BF16_WEIGHTS), get_tokenizer, out_dir=folder / "ddp_bf16_weights")
    results["ddp_bf16_weights"] = record(ddp_bf16, ddp_bf16.fit().history)
    results["fsdp_bf16_weights"] = compute_dtypes_of_a_step(
        Trainer(tiny_cfg(*COMMON, *FSDP, *BF16_WEIGHTS, "loop.steps=1"), get_tokenizer,
                out_dir=folder / "fsdp_bf16_weights"))
    torch.save(results, folder / f"rank{rank}.pt")
    dist.destroy_process_group()


def meta_run(folder: Path) -> dict:
    """What a meta-device-initialised bf16 FSDP run holds before and after one step."""
    trainer = Trainer(tiny_cfg(*COMMON, *FSDP, "loop.meta_init=true", "loop.bf16=true", "loop.steps=1"),
                      get_tokenizer, out_dir=folder / "meta")
    visual, teacher_visual = trainer.model.visual, trainer.teacher.ema_parts["backbone"]
    seen = {}

    def note_dtype(module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault("compute_dtype", next(module.parameters()).dtype)

    visual.blocks[0].mlp.register_forward_pre_hook(note_dtype)
    block_weight = visual.blocks[0].attn.qkv.weight
    fresh = {
        "is_shard": isinstance(block_weight, DTensor),
        "rows": block_weight.to_local().detach().clone(),
        "teacher_rows": teacher_visual.blocks[0].attn.qkv.weight.to_local().detach().clone(),
        "gamma": visual.blocks[0].ls1.gamma.to_local().detach().clone(),
        "positions": trainer.model.text.positions.clone(),
        "temperature": float(trainer.model.temperature),
    }
    history = trainer.fit().history
    return fresh | {"total": history[0]["total"], "compute_dtype": str(seen["compute_dtype"]),
                    "master_dtype": str(block_weight.dtype)}


def compute_dtypes_of_a_step(trainer: Trainer) -> dict:
    """The dtypes the first block's MLP computes in (weight, input, autocast on?) during one step."""
    seen = set()

    def note(module: torch.nn.Module, args: tuple) -> None:
        seen.add((str(module.fc1.weight.dtype), str(args[0].dtype), torch.is_autocast_enabled("cpu")))

    trainer.model.visual.blocks[0].mlp.register_forward_pre_hook(note)
    history = trainer.fit().history
    return {"seen": sorted(seen), "total": history[0]["total"]}


def _first(trainer: Trainer, steps: int):
    """The trainer's own stream, cut after ``steps`` batches (the run stops there, as if killed after its
    checkpoint)."""
    for index, batch in enumerate(trainer.batches()):
        if index == steps:
            return
        yield batch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    one = Trainer(tiny_cfg(*COMMON, *FSDP), get_tokenizer, out_dir=folder / "one")
    one.fit(_first(one, HALF))  # last.pt at step 2, for the 1 -> 2 resume
    mp.spawn(run_rank, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    references = {}
    for name, overrides in (("ddp", DDP), ("fsdp", FSDP), ("ddp_bf16_weights", (*DDP, *BF16_WEIGHTS))):
        single = Trainer(tiny_cfg(*COMMON, *overrides), get_tokenizer, out_dir=folder / f"single-{name}")
        references[name] = record(single, single.fit().history)
    return folder, ranks, references


def assert_same_run(got: dict, expected: dict) -> None:
    got_losses, expected_losses = got["losses"], expected["losses"]
    assert len(got_losses) == len(expected_losses) == STEPS
    for step, (a, b) in enumerate(zip(got_losses, expected_losses, strict=True)):
        for name in ("total", "clip_global", "clip_spatial", "dino", "ibot", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), (step, name)
    for part in ("student", "teacher"):
        assert got[part].keys() == expected[part].keys()
        for name, value in got[part].items():
            # parameters after a few Adam steps: their differences scale with the learning rate, not with |value|
            torch.testing.assert_close(value, expected[part][name], rtol=1e-4, atol=1e-5, msg=f"{part} {name}")


@pytest.mark.parametrize("name", ["ddp", "fsdp", "from_one"])
def test_two_processes_hold_identical_weights_and_log_identical_losses(runs, name):
    _, ranks, _ = runs
    assert ranks[0][name]["losses"] == ranks[1][name]["losses"]
    for part in ("student", "teacher"):
        for key, value in ranks[0][name][part].items():
            assert torch.equal(value, ranks[1][name][part][key]), (part, key)


def test_ddp_on_two_processes_equals_one_process(runs):
    _, ranks, references = runs
    assert_same_run(ranks[0]["ddp"], references["ddp"])


def test_fsdp_interrupted_then_resumed_on_two_processes_equals_one_uninterrupted_process(runs):
    folder, ranks, references = runs
    assert_same_run(ranks[0]["fsdp"], references["fsdp"])
    assert (folder / "fsdp" / "last.dcp").is_dir() and (folder / "fsdp" / "previous.dcp").is_dir()
    exported = tipstorch.load_model(folder / "fsdp" / "final.safetensors")  # one plain file
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, ranks[0]["fsdp"]["student"][f"model.{key}"], rtol=0, atol=0)


def test_fsdp_evaluates_the_whole_trained_model_on_rank_zero_only(runs):
    _, ranks, _ = runs
    trained = ranks[0]["fsdp"]["student"]
    expected = sum(float(value.double().sum()) for key, value in trained.items() if key.startswith("model."))
    assert ranks[0]["fsdp"]["eval_after"]["weight_sum"] == pytest.approx(expected, rel=1e-12)
    assert ranks[1]["fsdp"]["eval_after"] is None


def test_a_single_file_checkpoint_of_one_process_resumes_on_two_fsdp_processes(runs):
    _, ranks, references = runs
    expected = references["fsdp"]
    got = ranks[0]["from_one"]
    assert len(got["losses"]) == STEPS - HALF
    assert_same_run(got | {"losses": expected["losses"][:HALF] + got["losses"]}, expected)


def test_a_sharded_checkpoint_of_two_processes_resumes_on_one(runs):
    folder, _, references = runs
    state, path = load_checkpoint(folder / "fsdp" / "previous.dcp")
    assert state["step"] == HALF and path.name == "previous.dcp"
    alone = Trainer(tiny_cfg(*COMMON, *FSDP), get_tokenizer, out_dir=folder / "alone", resume=state)
    history = alone.fit().history
    expected = references["fsdp"]
    got = record(alone, history)
    assert_same_run(got | {"losses": expected["losses"][:HALF] + got["losses"]}, expected)


def test_meta_device_initialisation_draws_each_ranks_own_rows_at_the_init_scale(runs):
    _, ranks, _ = runs
    zero, one = ranks[0]["meta"], ranks[1]["meta"]
    assert zero["is_shard"] and zero["rows"].shape[0] * 2 == 3 * 32  # qkv [96, 32] split in two
    assert not torch.equal(zero["rows"], one["rows"])  # not the same draw repeated on every rank
    for rank in (zero, one):
        assert 0.015 < float(rank["rows"].std()) < 0.025  # trunc_normal(std=0.02) of the ViT init
        assert torch.equal(rank["teacher_rows"], rank["rows"])  # the EMA teacher starts as the student
        assert torch.equal(rank["gamma"], torch.full_like(rank["gamma"], 0.1))  # model.vision.layer_scale_init
        assert torch.equal(rank["positions"], sinusoidal_positions(64, 32))
        assert rank["temperature"] == pytest.approx(0.07, rel=1e-6)  # the tips-tiny config's


def test_fsdp_bf16_policy_computes_in_bf16_over_fp32_master_weights(runs):
    _, ranks, _ = runs
    meta = ranks[0]["meta"]
    assert (meta["compute_dtype"], meta["master_dtype"]) == ("torch.bfloat16", "torch.float32")
    assert torch.isfinite(torch.tensor(meta["total"]))


def test_ddp_on_bf16_compute_weights_equals_one_process_to_bf16_tolerance(runs):
    """DDP all-reduces the float32 gradients of the masters: the ranks stay identical and the run is one
    process's (bf16 activations of 4-row and 8-row matmuls may round apart: bf16 tolerance)."""
    _, ranks, references = runs
    got, expected = ranks[0]["ddp_bf16_weights"], references["ddp_bf16_weights"]
    assert got["losses"] == ranks[1]["ddp_bf16_weights"]["losses"]
    for step, (a, b) in enumerate(zip(got["losses"], expected["losses"], strict=True)):
        for name in ("total", "clip_global", "clip_spatial", "dino", "ibot", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=2e-2), (step, name)
    for key, value in got["student"].items():
        assert value.dtype == torch.float32 and torch.equal(value, ranks[1]["ddp_bf16_weights"]["student"][key])


def test_fsdp_on_bf16_compute_weights_runs_its_bf16_policy_without_autocast(runs):
    _, ranks, _ = runs
    for rank in ranks:
        got = rank["fsdp_bf16_weights"]
        assert got["seen"] == [("torch.bfloat16", "torch.bfloat16", False)]
        assert torch.isfinite(torch.tensor(got["total"]))
