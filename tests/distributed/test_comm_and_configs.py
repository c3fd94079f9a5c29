"""Single-process checks: the gradient quantizer, config validation, bad input before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qat.trainers.comm import (
    QuantizedReduceScatter, dequantize_buckets, grad_bits, pack_nibbles, payload_bytes,
    stochastic_quantize, unpack_nibbles,
)
from qat.trainers.deepspeed_utils import (
    check_deepspeed_config, check_engine_codes, load_config, prepare_for_deepspeed,
)
from qat.trainers.fsdp import check_packed_codes, check_world_size, shard_model
from tests.distributed import recipe as R

CONFIGS = Path(__file__).resolve().parents[2] / "scripts" / "accelerate"


# ------------------------------------------------------------------ quantizer
@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_quantize_grid_and_error(bits):
    qmax = 2 ** (bits - 1) - 1
    x = torch.randn(3, 1000) * torch.logspace(-4, 1, 1000)
    codes, step = stochastic_quantize(x, bits, 128, torch.Generator().manual_seed(0))
    assert codes.shape == (3, 8, 128) and step.shape == (3, 8)
    assert codes.abs().max() <= qmax  # |x / s| <= qmax: no clamp needed, so no bias
    err = (dequantize_buckets(codes, step, 1000) - x).abs()
    bound = step.repeat_interleave(128, dim=1)[:, :1000]
    assert torch.all(err < bound * (1 + 1e-6))  # stochastic rounding: < one step


def test_stochastic_quantize_is_unbiased():
    # Mean over 4000 draws; one draw's std <= step / 2, so the mean's <= step / 2 / sqrt(4000);
    # 6 of those bound 512 values with chance failure < 1e-6.
    x = torch.randn(1, 512)
    g = torch.Generator().manual_seed(1)
    draws = 4000
    mean = torch.zeros(1, 512)
    for _ in range(draws):
        codes, step = stochastic_quantize(x, 4, 512, g)
        mean += dequantize_buckets(codes, step, 512) / draws
    assert torch.all((mean - x).abs() <= 6 * step / 2 / draws ** 0.5)


def test_all_zero_bucket_and_nibbles():
    codes, step = stochastic_quantize(torch.zeros(2, 10), 4, 4)
    assert codes.abs().sum() == 0 and torch.all(step == 1)
    c = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = pack_nibbles(c)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(unpack_nibbles(packed), c)


def test_payload_bytes():
    # int4, 1000 values in buckets of 512: 2 buckets of 256 bytes + 2 fp32 steps.
    assert payload_bytes(1000, 4, 512) == 2 * 256 + 8
    assert payload_bytes(1000, 8, 512) == 2 * 512 + 8


def test_bad_gradient_settings():
    with pytest.raises(ValueError, match="quantized_grads='int2'"):
        grad_bits("int2")
    with pytest.raises(ValueError, match="8 or 4 bits"):
        QuantizedReduceScatter(bits=2)
    with pytest.raises(ValueError, match="even number"):
        QuantizedReduceScatter(bits=4, bucket=7)
    # shard_model refuses a bad setting before touching torch.distributed or the model.
    with pytest.raises(ValueError, match="quantized_grads='fp8'"):
        shard_model(nn.Linear(2, 2), quantized_grads="fp8")


# ------------------------------------------------------------------ FSDP2 checks
def test_world_size_must_fit_the_mesh():
    check_world_size(8, (2, 4))
    with pytest.raises(ValueError, match=r"mesh shape \(2, 4\) needs 8 processes but 6 were started"):
        check_world_size(6, (2, 4))
    with pytest.raises(ValueError, match="at least one process"):
        check_world_size(0)


def test_upcast_codes_are_refused():
    model = R.build_model()
    check_packed_codes(model)
    layer = model.model.layers[0].self_attn.q_proj
    layer.base_packed = nn.Parameter(layer.base_packed.float(), requires_grad=False)  # what a blanket cast does
    with pytest.raises(RuntimeError, match="base_packed is torch.float32"):
        check_packed_codes(model)
    with pytest.raises(RuntimeError, match="must stay frozen int32"):
        check_engine_codes(model)


# ------------------------------------------------------------------ DeepSpeed configs
def test_shipped_deepspeed_configs_validate():
    for name in ("ds_zero3.json", "ds_zero2.json"):
        assert check_deepspeed_config(CONFIGS / name, world_size=2, device_type="cpu")["zero_optimization"]
    zeropp = check_deepspeed_config(CONFIGS / "ds_zeropp.json", world_size=16, device_type="cuda")
    assert zeropp["zero_optimization"]["zero_quantized_gradients"] is True


def test_zeropp_is_refused_on_cpu_with_a_clear_message():
    with pytest.raises(ValueError, match="run only on CUDA in DeepSpeed.*this run is on cpu"):
        check_deepspeed_config(CONFIGS / "ds_zeropp.json", world_size=16, device_type="cpu")


@pytest.mark.parametrize("key", ["zero_quantized_weights", "zero_quantized_nontrainable_weights"])
def test_config_that_would_upcast_the_codes_is_refused(key):
    config = load_config(CONFIGS / "ds_zero3.json")
    config["zero_optimization"][key] = True
    with pytest.raises(ValueError, match=f"sets {key}: ZeRO\\+\\+ would cast qat's packed int32 codes"):
        check_deepspeed_config(config, model=R.build_model(), world_size=2, device_type="cuda")


def test_world_size_that_does_not_fit_the_deepspeed_config():
    config = load_config(CONFIGS / "ds_zeropp.json")
    with pytest.raises(ValueError, match="zero_hpz_partition_size=8 does not divide the world size 12"):
        check_deepspeed_config(config, world_size=12, device_type="cuda")
    batch = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
             "zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match=r"= 4 \* 2 \* 3 = 24"):
        check_deepspeed_config(batch, world_size=3, device_type="cpu")
    check_deepspeed_config(batch, world_size=4, device_type="cpu")


def test_zeropp_options_need_stage_3():
    with pytest.raises(ValueError, match="need zero_optimization.stage=3"):
        check_deepspeed_config({"zero_optimization": {"stage": 2, "zero_quantized_gradients": True}},
                               device_type="cuda")


def test_load_config_errors(tmp_path):
    assert load_config('{"zero_optimization": {"stage": 2}}')["zero_optimization"]["stage"] == 2
    with pytest.raises(FileNotFoundError, match="neither a file nor a JSON object"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(bad)
    json.loads((CONFIGS / "ds_zeropp.json").read_text())  # shipped files are plain JSON


def test_prepare_for_deepspeed_marks_quant_layers_as_zero3_leaves():
    pytest.importorskip("deepspeed")
    model = R.build_model()
    assert prepare_for_deepspeed(model) == 14  # 2 blocks x 7 projections
    ids = R.batches(1)[0]
    hidden = model.get_input_embeddings()(ids)
    assert hidden.requires_grad  # frozen embeddings now feed a graph ZeRO-3's hooks can follow
