"""QATTrainer on a tiny Llama: optimizer groups, learning, resume equivalence, checkpoints, NaN stop, ZO."""

import os
import time

import pytest
import torch
from datasets import Dataset

from qat.quant_linear import QuantLinear
from qat.trainers import NonFiniteLossError, QATArguments, QATTrainer, parameter_groups
from qat.trainers.checkpoint import TRAINABLE_FILE, load_checkpoint
from qat.trainers.run import prepare_model
from tests.conftest import tiny_llama


def _data(n=32, length=16, seed=0):
    # A learnable pattern: token t+1 = (token t + 3) mod 128, from random starts.
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 128, (n, 1), generator=g)
    ids = (starts + 3 * torch.arange(length)) % 128
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), task="causal_lm", max_steps=6, per_device_train_batch_size=4,
                learning_rate=5e-3, step_learning_rate=1e-3, logging_steps=1, save_steps=3, report_to="none",
                seed=0, adapter="lora", adapter_rank=4, bits=4, group_size=32, lr_scheduler_type="constant",
                dataloader_pin_memory=False, disable_tqdm=True)
    return QATArguments(**{**base, **kw})


def _trainer(args, teacher=None, seed=0):
    model = prepare_model(args, tiny_llama(seed), None)
    return QATTrainer(model=model, args=args, teacher=teacher, train_dataset=_data())


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_parameter_groups_split_by_role(tmp_path):
    args = _args(tmp_path, symmetric=False, zero_point_learning_rate=1e-4, weight_decay=0.1)
    model = prepare_model(args, tiny_llama(), None)
    groups = {g["name"]: g for g in parameter_groups(model, args)}
    assert set(groups) == {"adapters", "steps", "zero_points"}
    assert (groups["adapters"]["lr"], groups["adapters"]["weight_decay"]) == (5e-3, 0.1)
    assert (groups["steps"]["lr"], groups["steps"]["weight_decay"]) == (1e-3, 0.0)
    assert (groups["zero_points"]["lr"], groups["zero_points"]["weight_decay"]) == (1e-4, 0.0)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(groups["steps"]["params"]) == len(layers) == 14
    assert len(groups["adapters"]["params"]) == 2 * len(layers)  # lora_A, lora_B


@pytest.mark.parametrize("bits", [8, 2])
def test_relative_step_lr_moves_every_layer_by_the_same_fraction_of_its_step(tmp_path, bits):
    """step_lr_relative: one group per step tensor with lr = fraction * mean |s|. Adam's first update is
    lr * sign(grad) per element, so each layer's steps move by exactly its lr, the fraction of its mean
    step, at int8 (steps ~64x smaller) as at int2. Absolute (the default) would move both by 1e-3."""
    args = _args(tmp_path, bits=bits, storage_bits=8, step_lr_relative=True, step_learning_rate=1e-3,
                 adapter="none")
    model = prepare_model(args, tiny_llama(), None)
    groups = parameter_groups(model, args)
    steps = [g for g in groups if g["name"] == "steps"]
    assert len(steps) == sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    before = [g["params"][0].detach().clone() for g in steps]
    for g, s0 in zip(steps, before):
        assert g["lr"] == pytest.approx(1e-3 * s0.abs().mean().item(), rel=1e-6)
    optimizer = torch.optim.Adam(groups, eps=1e-30)  # eps negligible: the update is lr * sign(grad)
    batch = _data(n=4)[:]
    model(**{k: torch.tensor(v) for k, v in batch.items()}).loss.backward()
    optimizer.step()
    for g, s0 in zip(steps, before):
        p = g["params"][0]
        moved = (p.detach() - s0).abs()[p.grad != 0]
        assert moved.numel() > 0
        assert torch.allclose(moved, torch.full_like(moved, g["lr"]), rtol=1e-3)  # fp32 s + lr rounding


def test_relative_step_lr_is_refused_where_steps_are_sharded(tmp_path):
    with pytest.raises(ValueError, match="step_lr_relative sizes each layer's step learning rate"):
        _args(tmp_path, step_lr_relative=True, fsdp="full_shard")


def test_first_order_training_lowers_the_loss(tmp_path):
    trainer = _trainer(_args(tmp_path, max_steps=30, save_steps=100, learning_rate=1e-2))
    trainer.train()
    losses = _losses(trainer)
    # Only a rank-4 LoRA and the steps train on a random tiny Llama: measured 4.87 -> 4.46 (0.92x).
    # A run whose gradients do not reach the adapters stays at ~1.0x.
    assert losses[30] < 0.95 * losses[1], losses


def test_resume_gives_the_same_losses_and_checkpoints_hold_no_base(tmp_path):
    full = _trainer(_args(tmp_path / "full"))
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    from safetensors import safe_open

    with safe_open(str(ckpt / TRAINABLE_FILE), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("base_" in k or k.endswith(".weight") and ".adapter." not in k for k in keys)
    # the file is the trainable tensors (fp32) plus a safetensors header of a few KB, nothing more
    trainable = sum(p.numel() * 4 for p in full.model.parameters() if p.requires_grad)
    assert trainable <= os.path.getsize(ckpt / TRAINABLE_FILE) < trainable + 16_384

    resumed = _trainer(_args(tmp_path / "full"))  # same output_dir: resume picks checkpoint-3 explicitly
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = _losses(full), _losses(resumed)
    assert resumed.state.global_step == 6 and set(b) == {1, 2, 3, 4, 5, 6}  # 1-3 restored from trainer_state
    for step in (4, 5, 6):  # same data order, RNG and state: identical up to fp32 summation order
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    trainer = _trainer(_args(tmp_path / "run", max_steps=3))
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    other = prepare_model(_args(tmp_path / "x"), tiny_llama(seed=1), None)  # different base weights
    with pytest.raises(ValueError, match="different quantized base"):
        load_checkpoint(other, ckpt)
    data = (ckpt / TRAINABLE_FILE).read_bytes()
    (ckpt / TRAINABLE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(trainer.model, ckpt)


class _PoisonAfter:
    """A callback that makes a step size NaN once the given step is reached (a diverging run)."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):
        return lambda *a, **k: None

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            next(m for m in model.modules() if isinstance(m, QuantLinear)).weight_scale.data.fill_(float("nan"))


def test_nan_loss_stops_with_the_last_good_checkpoint_named(tmp_path):
    args = _args(tmp_path, max_steps=8, save_steps=2)
    trainer = _trainer(args)
    trainer.add_callback(_PoisonAfter(4))
    # The NaN step sizes of step 4 are refused at the save (issue 17: a "good" checkpoint holding NaN
    # would NaN again on resume); checkpoint-2 is named instead.
    with pytest.raises(NonFiniteLossError, match=r"diverged by step 4: .*NaN.*checkpoint-2"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # the refused save left no partial folder
    load_checkpoint(_trainer(args).model, tmp_path / "checkpoint-2")  # the kept checkpoint is intact


def test_zeroth_order_trains_without_gradients_or_optimizer_state(tmp_path):
    args = _args(tmp_path, optim="zo", max_steps=4, save_steps=100, zo_targets="both", zo_num_perturbations=2,
                 learning_rate=1e-3)
    trainer = _trainer(args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(after[n].grad is None for n in before)  # no backward pass ever ran
    assert all(not s for s in trainer.optimizer.state.values())  # SGD without momentum: no state
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert len(moved) == len(before)
    assert len(_losses(trainer)) == 4


def test_fake_quant_schedule_trains_unquantized_first(tmp_path):
    seen = []

    class Spy:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_end(self, args, state, control, model=None, **kw):
            seen.append(next(m for m in model.modules() if isinstance(m, QuantLinear)).fake_quant_enabled)

    trainer = _trainer(_args(tmp_path, fake_quant_start_step=2, max_steps=4, save_steps=100))
    trainer.add_callback(Spy())
    trainer.train()
    assert seen == [False, False, True, True]
    assert all(m.fake_quant_enabled for m in trainer.model.modules() if isinstance(m, QuantLinear))


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    # 2 micro-batches of 2 == 1 batch of 4 for per-token-mean losses over equal-length rows. SGD, so
    # the update is linear in the gradient (Adam would amplify fp32 noise in near-zero step gradients).
    kw = dict(max_steps=2, save_steps=100, optim="sgd")
    one = _trainer(_args(tmp_path / "a", per_device_train_batch_size=4, **kw))
    two = _trainer(_args(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw))
    one.train()
    two.train()
    for (n, p), (_, q) in zip(one.model.named_parameters(), two.model.named_parameters()):
        if p.requires_grad:  # fp32 sums in a different order: agree to ~1e-7 relative
            assert torch.allclose(p, q, atol=1e-7, rtol=1e-5), n


def test_wandb_offline_run_is_recorded(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = _trainer(_args(tmp_path / "out", max_steps=2, save_steps=100, report_to="wandb",
                             run_name="qat-test"))
    trainer.train()
    import wandb

    wandb.finish()
    records = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    # wandb's service process writes the run file on its own; on a loaded machine (seen in CI with a
    # benchmark beside it) the records can land a moment after finish() returns, so wait up to 30 s.
    deadline = time.monotonic() + 30
    while b"train/loss" not in records[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"train/loss" in records[0].read_bytes()  # the Trainer's loss went to the offline run


def test_8bit_optimizer_states_through_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    # rank 64 on the 64-wide tiny Llama: lora_A is [64, 64] = 4096 values, the size from which
    # bitsandbytes keeps 8-bit states (smaller tensors stay fp32 by its design).
    trainer = _trainer(_args(tmp_path, optim="adamw_bnb_8bit", adapter_rank=64, max_steps=3, save_steps=100,
                             adapter_targets=["q_proj", "o_proj", "mlp"]))  # k/v are 32 wide
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert [g["name"] for g in opt.param_groups] == ["adapters", "steps"]
    dtypes = {t.dtype for s in opt.state.values() for k, t in s.items() if k in ("state1", "state2")}
    assert torch.uint8 in dtypes


def test_tensorboard_events_carry_the_training_loss(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(_args(tmp_path / "out", max_steps=3, save_steps=100, report_to="tensorboard"))
    trainer.train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx([v for _, v in sorted(_losses(trainer).items())], rel=1e-6)


def test_quantized_grads_without_fsdp_is_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match="quantized_grads needs FSDP2"):
        _trainer(_args(tmp_path, quantized_grads="int8", max_steps=1))
    assert not list(tmp_path.glob("checkpoint-*"))
