"""Two gloo processes on CPU: the distributed losses equal the single-process losses on the whole batch.

One spawn (module fixture) computes every distributed result; each test compares one of them.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import assert_close_to_scale
from tests.train.train_fakes import (
    accumulated_tips_step,
    make_batch,
    make_student,
    tips_loss,
)
from tipstorch.train.losses import ContrastiveLoss, ScoreCentering
from tipstorch.train.teacher import EMATeacher

WORLD = 2
ROWS = 8  # global batch; 4 per rank


def features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, 6, generator=generator), torch.randn(ROWS, 6, generator=generator)


def centre_scores() -> torch.Tensor:
    return torch.arange(ROWS * 3, dtype=torch.float32).reshape(ROWS, 3) ** 0.5



def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    results = {}

    image, text = (tensor[rows].clone().requires_grad_(True) for tensor in features(seed=0))
    temperature = torch.tensor(0.3, requires_grad=True)
    loss = ContrastiveLoss()(image, text, temperature)
    loss.backward()
    results |= {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, "temp_grad": temperature.grad}

    centering = ScoreCentering(num_prototypes=3, momentum=0.5)
    centering.accumulate(centre_scores()[rows])
    centering.step()
    results["center"] = centering.center

    student = make_student()
    teacher, recipe_loss = EMATeacher(student.parts(), mode="full"), tips_loss()
    parts = accumulated_tips_step(student, teacher, recipe_loss, {k: v[rows] for k, v in make_batch(batch=ROWS).items()}, 2)
    for parameter in student.parameters():  # what DDP does: average the gradients over ranks
        dist.all_reduce(parameter.grad)
        parameter.grad /= WORLD
    results |= {f"grad.{name}": p.grad for name, p in student.named_parameters()}
    results |= {"tips_total": parts["total"], "dino_center": recipe_loss.dino.centering.center}

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    image, text = (tensor.clone().requires_grad_(True) for tensor in features(seed=0))
    temperature = torch.tensor(0.3, requires_grad=True)
    loss = ContrastiveLoss()(image, text, temperature)
    loss.backward()
    return {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, "temp_grad": temperature.grad}


def test_mean_of_rank_losses_is_the_global_batch_loss(ranks, single):
    mean = sum(result["loss"] for result in ranks) / WORLD
    torch.testing.assert_close(mean, single["loss"])


def test_feature_gradients_after_ddp_averaging_are_the_global_batch_gradients(ranks, single):
    for key in ("image_grad", "text_grad"):
        gathered = torch.cat([result[key] for result in ranks]) / WORLD
        assert_close_to_scale(gathered, single[key])


def test_temperature_gradient_after_ddp_averaging_is_the_global_one(ranks, single):
    torch.testing.assert_close(sum(result["temp_grad"] for result in ranks) / WORLD, single["temp_grad"])


def test_centre_is_all_reduced_to_the_global_batch_mean_on_every_rank(ranks):
    expected = 0.5 * centre_scores().mean(dim=0)
    for result in ranks:
        torch.testing.assert_close(result["center"], expected)


def test_two_ranks_with_accumulation_match_one_process_full_batch_accumulated_tips_step(ranks):
    student = make_student()
    teacher, loss = EMATeacher(student.parts(), mode="full"), tips_loss()
    parts = accumulated_tips_step(student, teacher, loss, make_batch(batch=ROWS), 1)
    torch.testing.assert_close(sum(result["tips_total"] for result in ranks) / WORLD, parts["total"])
    for name, parameter in student.named_parameters():
        for result in ranks:
            assert_close_to_scale(result[f"grad.{name}"], parameter.grad, msg=name)
    for result in ranks:
        torch.testing.assert_close(result["dino_center"], loss.dino.centering.center)
