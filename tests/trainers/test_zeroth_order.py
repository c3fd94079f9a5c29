"""SPSA with the seed trick: exact restore, the estimate's expectation, and loss going down."""

import torch
from torch import nn

from qat.config import LayerSpec
from qat.quant_linear import QuantLinear
from qat.trainers.zeroth_order import MIN_STEP, ZOTensor, zo_step, zo_tensors


def _quadratic(p, target):
    return lambda: ((p - target) ** 2).sum()


def test_perturbations_cancel_and_same_seed_same_update():
    # lr 0: the step must leave the tensor as it was up to fp32 rounding of +eps z - 2 eps z + eps z.
    p = nn.Parameter(torch.randn(50, dtype=torch.float64))
    before = p.detach().clone()
    zo_step([ZOTensor(p, 0, False)], _quadratic(p, torch.zeros(50)), seed=3, eps=1e-3, num_perturbations=2,
            groups=[{"lr": 0.0}])
    assert torch.allclose(p.detach(), before, atol=1e-15)
    a, b = nn.Parameter(before.clone()), nn.Parameter(before.clone())
    for q in (a, b):
        zo_step([ZOTensor(q, 0, False)], _quadratic(q, torch.ones(50)), seed=7, eps=1e-3, num_perturbations=1,
                groups=[{"lr": 1e-2}])
    assert torch.equal(a, b)  # the seed alone determines z: every rank draws the same perturbation


def test_estimate_is_unbiased_for_a_quadratic():
    # For L = ||p - t||^2, (L(p+ez) - L(p-ez)) / 2e = 2 (p - t).z exactly, so E[g z] = 2 (p - t):
    # the mean update over many seeds approaches lr * 2 (p - t) with error ~ 1/sqrt(seeds).
    torch.manual_seed(0)
    start, target = torch.randn(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    updates = []
    for seed in range(4000):
        p = nn.Parameter(start.clone())
        zo_step([ZOTensor(p, 0, False)], _quadratic(p, target), seed, 1e-4, 1, [{"lr": 1.0}])
        updates.append(start - p.detach())
    mean = torch.stack(updates).mean(0)
    grad = 2 * (start - target)
    # per coordinate std of g z_i is about |grad| * sqrt(2); 4000 samples -> ~4.5 standard errors allowed
    assert (mean - grad).abs().max() < 4.5 * grad.norm() * 2 ** 0.5 / 4000 ** 0.5


def test_zo_lowers_the_loss_of_a_quantized_layer_and_keeps_steps_positive():
    torch.manual_seed(0)
    dense = nn.Linear(32, 16)
    teacher = nn.Linear(32, 16)
    # The target differs by a rank-2 update: reachable by a rank-4 LoRA over a near-lossless base.
    teacher.weight.data = dense.weight.data + 0.1 * torch.randn(16, 2) @ torch.randn(2, 32)
    teacher.bias.data = dense.bias.data.clone()
    layer = QuantLinear.from_linear(dense, LayerSpec(bits=4, group_size=16, storage_bits=8))
    from qat.adapters import LoRAAdapter

    layer.adapter = LoRAAdapter(32, 16, 4, 8.0, placement="inside")
    layer.adapter.lora_B.data.normal_(0, 1e-3)  # B=0 would make A's directions flat at the start
    x = torch.randn(64, 32)
    with torch.no_grad():
        y = teacher(x)
    model = nn.Sequential(layer)
    loss = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
    tensors = [ZOTensor(p, 0, rel) for _, p, rel in zo_tensors(model, "both")]
    assert any(t.relative for t in tensors) and any(not t.relative for t in tensors)
    start = loss().item()
    for step in range(300):
        zo_step(tensors, loss, seed=step, eps=1e-3, num_perturbations=2, groups=[{"lr": 1e-2}], clip=100.0)
    end = loss().item()
    assert end < 0.8 * start, (start, end)  # measured 0.571 -> 0.397; SPSA is noisy, so ask for 20% only
    assert layer.weight_scale.min().item() >= MIN_STEP
