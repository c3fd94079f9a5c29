"""Zeroth-order under data parallelism: same z on every rank, only the two scalar losses cross ranks.

Two gloo processes each see half of a batch; after a few ZO steps their parameters must equal a
single process's on the whole batch (the mean of equal-sized half-batch losses is the full-batch loss).
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qat.trainers.zeroth_order import ZOTensor, zo_step

STEPS = 5


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.randn(32, 8, dtype=torch.float64)
    y = torch.randn(32, 1, dtype=torch.float64)
    return model, x, y


def _train(model, x, y):
    tensors = [ZOTensor(p, 0, False) for p in model.parameters()]
    for step in range(STEPS):
        zo_step(tensors, lambda: ((model(x) - y) ** 2).mean(), seed=step, eps=1e-3, num_perturbations=2,
                groups=[{"lr": 0.05}])
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, x, y = _setup()
        half = slice(16 * rank, 16 * (rank + 1))
        out[rank] = _train(model, x[half], y[half])
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process_on_the_full_batch():
    model, x, y = _setup()
    reference = _train(model, x, y)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    assert torch.equal(out[0], out[1])  # every rank applied the same update
    # float64: the ranks' (l0 + l1) / 2 differs from the full-batch mean only by rounding (~1e-16 relative)
    assert torch.allclose(out[0], reference, rtol=0, atol=1e-12)
