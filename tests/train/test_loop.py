"""The training loop: learning, resume equivalence, interruption, NaN stop, export, variants."""

import json
import math
import signal

import pytest
import torch

import tipstorch
from tests.train.loop_helpers import losses, parameters, signal_after, tiny_trainer
from tipstorch.train.config import ConfigError
from tipstorch.train.distributed import DistributedContext
from tipstorch.train.loop import LOG_FILE, NonFiniteLossError, Trainer
from tipstorch.train.run_state import FINAL, LAST, PREVIOUS, load_checkpoint
from tipstorch.weights.factory import get_tokenizer
from tipstorch.weights.state_io import CheckpointError


def test_a_50_step_run_on_16_scenes_lowers_the_contrastive_losses_below_chance(tmp_path):
    # The full TIPSv2 recipe. Only the contrastive parts have a reference value (chance = log batch);
    # the self-distillation parts start low (untrained teacher and student heads agree) and rise first.
    # lr 1e-3: the loop must fit 16 scenes fast, whatever learning rate the tiny_cpu recipe uses
    trainer = tiny_trainer(tmp_path, "loop.steps=50", "data.num_samples=16", "loop.batch_size=16", "optim.lr=1e-3")
    history = trainer.fit().history
    chance = math.log(16)

    def mean(part: str, steps: list[dict]) -> float:
        return sum(step[part] for step in steps) / len(steps)

    assert mean("clip_spatial", history[-10:]) < min(chance, mean("clip_spatial", history[:10])) - 0.5
    assert mean("clip_global", history[-10:]) < min(chance, mean("clip_global", history[:10])) - 0.1
    assert all(math.isfinite(step["total"]) for step in history)


def straight_and_resumed(tmp_path, steps: int, config: str, *overrides: str):
    """Train ``steps`` straight; and again with a SIGTERM at steps / 2 and a fresh Trainer resuming."""
    straight = tiny_trainer(tmp_path / "straight", f"loop.steps={steps}", *overrides, config=config)
    straight_history = losses(straight.fit().history)
    interrupted = tiny_trainer(tmp_path / "resumed", f"loop.steps={steps}", *overrides, config=config)
    result = interrupted.fit(signal_after(interrupted.batches(), steps // 2))
    assert (result.status, result.step, result.signal_name) == ("interrupted", steps // 2, "SIGTERM")
    state, _ = load_checkpoint(tmp_path / "resumed")
    resumed = Trainer(interrupted.cfg, get_tokenizer, out_dir=tmp_path / "resumed", resume=state)
    assert resumed.step == steps // 2
    resumed_history = losses(interrupted.history + resumed.fit().history)
    return straight, straight_history, resumed, resumed_history


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("tiny_cpu", ["loop.accumulation_steps=2"]),  # TIPSv2: head-only EMA, iBOT++, two micro-batches
        ("tips", []),  # TIPS: full EMA teacher, iBOT on masked tokens
        ("tiny_cpu", ["model.vision.depth=2", "model.vision.drop_path_rate=0.5"]),  # random draws: RNG resumes
        # bf16 compute weights: the checkpoint holds the float32 masters, the copies are made again
        ("tiny_cpu", ["loop.bf16=true", "loop.bf16_mode=weights", "loop.accumulation_steps=2"]),
    ],
)
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, config, overrides):
    straight, straight_history, resumed, resumed_history = straight_and_resumed(tmp_path, 40, config, *overrides)
    assert resumed_history == straight_history
    resumed_parameters = parameters(resumed.student)
    for name, value in parameters(straight.student).items():
        assert torch.equal(value, resumed_parameters[name]), name
    for (name, value), other in zip(straight.teacher.state_dict().items(), resumed.teacher.state_dict().values(),
                                    strict=True):
        assert torch.equal(value, other), name
    torch.testing.assert_close(straight.loss.state_dict(), resumed.loss.state_dict(), rtol=0, atol=0)


@pytest.mark.slow
def test_2000_steps_straight_equal_1000_then_kill_then_1000_resumed(tmp_path):
    straight, straight_history, resumed, resumed_history = straight_and_resumed(tmp_path, 2000, "tiny_cpu")
    assert resumed_history == straight_history
    resumed_parameters = parameters(resumed.student)
    assert all(torch.equal(value, resumed_parameters[name]) for name, value in parameters(straight.student).items())


def test_sigint_stops_after_the_step_with_a_checkpoint(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=10")
    result = trainer.fit(signal_after(trainer.batches(), 3, signal.SIGINT))
    assert (result.status, result.signal_name, result.signal_number) == ("interrupted", "SIGINT", signal.SIGINT)
    state, path = load_checkpoint(tmp_path)
    assert path == tmp_path / LAST and state["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def nan_after(batches, good_steps: int):
    """The batches, with NaN pixels from batch ``good_steps`` on."""
    for index, batch in enumerate(batches):
        if index >= good_steps:
            batch = dict(batch, global_crop=torch.full_like(batch["global_crop"], float("nan")))
        yield batch


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=10", "loop.checkpoint_every=2")
    with pytest.raises(NonFiniteLossError, match=r"step 5 .*clip_global=nan.*last good checkpoint"):
        trainer.fit(nan_after(trainer.batches(), 5))
    state, _ = load_checkpoint(tmp_path)
    assert state["step"] == 4
    assert all(torch.isfinite(value).all() for value in state["student"].values())
    assert trainer.step == 5  # the failing step did not count
    assert not (tmp_path / FINAL).exists()


def test_no_parameter_changes_in_the_step_that_failed(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=4")
    before = parameters(trainer.student)
    with pytest.raises(NonFiniteLossError):
        trainer.fit(nan_after(trainer.batches(), 0))
    after = parameters(trainer.student)
    assert all(torch.equal(value, after[name]) for name, value in before.items())


def test_final_export_loads_with_load_model_and_equals_the_trained_model(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=3")
    result = trainer.fit()
    assert result.status == "completed" and result.export == tmp_path / FINAL
    loaded = tipstorch.load_model(result.export)
    trained = trainer.model.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(value, trained[name]) for name, value in loaded.state_dict().items())
    images = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(loaded.encode_image(images).global_cls, trainer.model.eval().encode_image(images).global_cls)


def test_run_directory_holds_config_log_tensorboard_and_checkpoints(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=6", "loop.log_every=2", "loop.checkpoint_every=2",
                           "loop.keep_every=4")
    trainer.fit()
    assert {path.name for path in tmp_path.iterdir()} >= {"config.yaml", LOG_FILE, "tensorboard", LAST, PREVIOUS,
                                                          "step-4.pt", FINAL}
    lines = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert {"clip_global", "clip_spatial", "dino", "ibot", "total", "images_per_s", "lr"} <= set(lines[0]["train"])
    assert load_checkpoint(tmp_path / PREVIOUS)[0]["step"] == 4 and load_checkpoint(tmp_path / "step-4.pt")[0]["step"] == 4
    assert any((tmp_path / "tensorboard").iterdir())


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=4", "loop.checkpoint_every=2")
    trainer.fit()
    (tmp_path / LAST).write_bytes((tmp_path / LAST).read_bytes()[:100])
    state, path = load_checkpoint(tmp_path)
    assert (state["step"], path.name) == (2, PREVIOUS)
    with pytest.raises(CheckpointError, match=r"last\.pt.*truncated"):
        load_checkpoint(tmp_path / LAST)


def test_clip_only_recipe_trains_without_heads_teacher_or_masked_pass(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=3", config="clip_only")
    assert trainer.student.dino_head is None and trainer.student.ibot_head is None and trainer.teacher is None
    assert not trainer.student.needs_masked and not trainer.model.visual.mask_token.requires_grad
    history = trainer.fit().history
    assert set(losses(history)[0]) == {"clip_global", "total", "grad_norm", "lr", "temperature", "teacher_momentum"}
    state, _ = load_checkpoint(tmp_path)
    assert not any(key.startswith(("dino_head", "ibot_head")) for key in state["student"]) and state["teacher"] == {}


def test_one_step_sends_gradients_to_towers_heads_and_temperature_and_none_to_the_teacher(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=2", config="tips")  # full EMA teacher
    batch = next(iter(trainer.batches()))
    trainer.train_step(batch)
    grads = {name: p.grad for name, p in trainer.student.named_parameters()}
    for prefix in ("model.visual.blocks.0", "model.visual.mask_token", "model.text.transformer", "dino_head.mlp",
                   "ibot_head.prototypes", "model.temperature"):
        assert any(grad is not None and grad.abs().sum() > 0 for name, grad in grads.items() if name.startswith(prefix)), prefix
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())


def test_head_only_teacher_adds_no_backbone_copy(tmp_path):
    trainer = tiny_trainer(tmp_path, "loop.steps=1")  # tiny_cpu: TIPSv2 head-only EMA
    assert trainer.teacher["backbone"] is trainer.model.visual
    assert not any(key.startswith("backbone") for key in trainer.teacher.state_dict())


def test_temperature_is_clamped_after_each_step(tmp_path):
    # With a 100x temperature lr one step moves the temperature from 0.0691 to ~0.17: a floor of 0.2 is
    # then reached only through the clamp after the step.
    step = ["loop.steps=1", "model.temperature=0.0691", "optim.temperature_lr_scale=100",
            "schedule.warmup_steps=0"]
    free = tiny_trainer(tmp_path / "free", *step, "loss.min_temperature=1e-6")
    free.fit()
    assert free.model.temperature.item() < 0.2  # where the step alone lands
    trainer = tiny_trainer(tmp_path / "clamped", *step, "loss.min_temperature=0.2")
    trainer.fit()
    assert trainer.model.temperature.item() >= 0.2
    assert trainer.model.temperature.item() == pytest.approx(0.2)


def test_evaluate_runs_before_and_after_and_is_kept_across_a_resume(tmp_path):
    calls = []

    def evaluate(model, tokenizer):
        calls.append(model.training)
        return {"score": float(len(calls))}

    trainer = tiny_trainer(tmp_path, "loop.steps=4", evaluate=evaluate)
    result = trainer.fit(signal_after(trainer.batches(), 2))
    assert result.eval_before == {"score": 1.0} and calls == [False]
    state, _ = load_checkpoint(tmp_path)
    result = Trainer(trainer.cfg, get_tokenizer, out_dir=tmp_path, resume=state, evaluate=evaluate).fit()
    assert (result.eval_before, result.eval_after) == ({"score": 1.0}, {"score": 2.0})
    assert calls == [False, False]  # evaluated in eval mode, not re-evaluated before the resumed part


def test_evaluations_run_on_eval_threads_and_training_on_loop_threads(tmp_path):
    # tiny_cpu trains on 1 thread beside its data worker; its evaluations draw no batch and use every core
    threads_seen = {}

    def evaluate(model, tokenizer):
        threads_seen.setdefault("eval", []).append(torch.get_num_threads())
        return {}

    def batches_counting_threads(batches):
        for batch in batches:
            threads_seen.setdefault("train", []).append(torch.get_num_threads())
            yield batch

    trainer = tiny_trainer(tmp_path, "loop.steps=2", "loop.threads=1", "eval.threads=3", evaluate=evaluate)
    trainer.fit(batches_counting_threads(trainer.batches()))
    assert threads_seen == {"eval": [3, 3], "train": [1, 1]}
    assert torch.get_num_threads() == 1
    with pytest.raises(ConfigError, match="eval.threads must be >= 0"):
        tiny_trainer(tmp_path, "eval.threads=-1")


def test_step_checkpoints_are_kept_at_every_multiple_of_keep_every_whatever_checkpoint_every(tmp_path):
    # tips_g14_paper.yaml: checkpoint_every 1000, keep_every 7080 -> step-92040.pt (13 epochs) must be written
    trainer = tiny_trainer(tmp_path, "loop.steps=7", "loop.checkpoint_every=4", "loop.keep_every=3")
    trainer.fit()
    assert sorted(path.name for path in tmp_path.glob("step-*.pt")) == ["step-3.pt", "step-6.pt"]
    assert [load_checkpoint(tmp_path / name)[0]["step"] for name in ("step-3.pt", "step-6.pt")] == [3, 6]
    assert load_checkpoint(tmp_path / LAST)[0]["step"] == 7


def test_fsdp_with_adafactor_is_refused_before_anything_is_built(tmp_path):
    two_ranks = DistributedContext(rank=0, world_size=2, device=torch.device("cpu"))  # no process group needed
    with pytest.raises(ConfigError, match="optim.name 'adafactor' does not run on FSDP shards"):
        tiny_trainer(tmp_path, "loop.parallel=fsdp", "optim.name=adafactor", context=two_ranks)
