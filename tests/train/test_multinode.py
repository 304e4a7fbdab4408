"""Two torchrun agents, as two nodes of one process each, meet through the c10d rendezvous and train with
FSDP from the environment torchrun sets (slow: four Python processes start)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tipstorch
from tests.train.test_commands import REPO, tiny_args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_rendezvous_through_c10d_and_train_with_fsdp(tmp_path):
    port, out_dir = free_port(), tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO), "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "multinode-test", "-m", "tipstorch.cli", "train",
             *tiny_args(out_dir, "--steps", "2", "--set", "loop.parallel=fsdp")],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "on 2 process(es)" in "".join(outputs)
    assert (Path(out_dir) / "last.dcp").is_dir()
    assert tipstorch.load_model(out_dir / "final.safetensors").visual.embed_dim == 32
