"""DDP on 2 CPU processes (gloo): the ranks stay identical and match one process on the whole batch."""

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import assert_close_to_scale
from tests.train.loop_helpers import first, parameters, tiny_cfg
from tipstorch.train.loop import Trainer
from tipstorch.weights.factory import get_tokenizer

WORLD = 2
STEPS = 3
OVERRIDES = (f"loop.steps={STEPS}", "loop.batch_size=8")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(tiny_cfg(*OVERRIDES), get_tokenizer, out_dir=Path(folder) / "run")
    assert (trainer.context.rank, trainer.context.world_size, trainer.local_batch) == (rank, WORLD, 4)
    batches = torch.load(Path(folder) / "batches.pt", weights_only=True)
    rows = slice(rank * 4, (rank + 1) * 4)
    history = trainer.fit([{key: value[rows] for key, value in batch.items()} for batch in batches]).history
    torch.save({"parameters": parameters(trainer.student), "total": [step["total"] for step in history]},
               Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_agree_and_match_one_process_on_the_whole_batch(tmp_path):
    single = Trainer(tiny_cfg(*OVERRIDES), get_tokenizer, out_dir=tmp_path / "single")
    batches = first(single.batches(), STEPS)
    torch.save(batches, tmp_path / "batches.pt")
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    single_history = single.fit(batches).history
    expected = parameters(single.student)
    for name, value in ranks[0]["parameters"].items():
        assert torch.equal(value, ranks[1]["parameters"][name]), name
        # parameters after a few Adam steps: their differences scale with the learning rate, not with |value|
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # each rank's total has its own self-supervised parts; their mean is the whole batch's
    mean_total = [(a + b) / 2 for a, b in zip(ranks[0]["total"], ranks[1]["total"], strict=True)]
    assert_close_to_scale(torch.tensor(mean_total), torch.tensor([step["total"] for step in single_history]))
    assert (tmp_path / "run" / "last.pt").exists()
