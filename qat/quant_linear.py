"""QuantLinear: a frozen packed low-bit base, learned steps, and an adapter slot.

    base (frozen)      W0 = s0 * (q0 - z0)           q0 packed at storage_bits into int32 words
    inside  placement  W_hat = s * (clamp(round((W0 + D)/s) + z) - z)       y = x W_hat^T + b
    outside placement  W_hat = s * (clamp(round(W0/s) + z) - z)             y = x W_hat^T + b + adapter(x)

Training modes (``train_mode``, set with :meth:`set_train_mode`; qat.train_modes for a model):

    fake_quant    (default) the line above: the codes are re-rounded from W0 (+ D) every step
    frozen_codes  W_hat = s * (q0 - z): the base codes q0 are fixed, only s (and z) train, so
                  moving a step never flips a code (EfficientQAT's E2E-QP)
    full_weight   W_hat = s * (clamp(round((W + D)/s) + z) - z) with W a trainable float master
                  weight (``master_weight``, torchao-style QAT); exported as its codes

``s`` (``weight_scale``) and ``z`` (``weight_zero_point``, asymmetric only) train with LSQ / LSQ+
gradients. Export writes ``clamp(round((W0 + D)/s) + z)`` and ``s`` (see :meth:`export_codes`),
so the exported model computes exactly what this layer computed.

Adapters plug into ``self.adapter``: any module following ``qat.adapter.Adapter`` (``placement``
"inside" or "outside", ``delta_weight() -> [out, in]``, ``forward(x) -> [..., out]``, optionally
``low_rank_factors()`` for the fused kernels); ``qat.adapters`` ships LoRA and WHT.
"""

from __future__ import annotations

import torch
from torch import nn

from qat import primitives as P
from qat.adapter import inside_adapter
from qat.config import LayerSpec
from qat.kernels import dispatch
from qat.packing import packed_width

TRAIN_MODES = ("fake_quant", "frozen_codes", "full_weight")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed, [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class _RecomputedLinear(torch.autograd.Function):
    """y = x W_hat^T where W_hat is rebuilt from the packed codes in backward, not saved.

    Saves only x (which the caller's graph holds anyway); peak memory holds one dense weight at
    a time, transiently, instead of one per layer between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, layer, *trainables):
        # The path is chosen once, here, under the kernel mode the forward ran in: the backward
        # takes the same one even when it runs outside that ``use_kernels`` block.
        path = dispatch.kernel_path(layer, x)
        with torch.no_grad():
            y = dispatch.quant_linear(x, layer, path)  # fused Triton on CUDA, else x @ W_hat^T
        ctx.layer, ctx.path = layer, path
        ctx.save_for_backward(x, *trainables)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *_ = ctx.saved_tensors
        layer = ctx.layer
        trainables = layer.trainable_tensors()  # the live leaves W_hat is rebuilt from
        if ctx.path != "reference":
            # Fused Triton on CUDA: dX, and the step / zero-point / adapter gradient reductions,
            # each rebuilding W_hat tiles from the codes; no dense [out, in] W_hat or G.
            grad_x, grads = dispatch.quant_linear_backward(grad_y, x, layer, trainables, ctx.path,
                                                           need_dx=ctx.needs_input_grad[0])
            return (grad_x, None, *grads)
        with torch.enable_grad():
            w_hat = layer.fake_quant_weight()  # rebuilt once, used for dX and the step grads
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ w_hat.detach().to(grad_y.dtype)
        grads = [None] * len(trainables)
        if trainables:
            grad_w = P.linear_weight_grad(grad_y, x, w_hat.dtype)  # G = grad_y^T x, [out, in]
            grads = torch.autograd.grad(w_hat, trainables, grad_w, allow_unused=True)
        return (grad_x, None, *grads)


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` (or GPT-2 ``Conv1D``) over a packed low-bit base."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: LayerSpec,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "layer",
    ):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.group_size = P.check_group_size(in_features, spec.group_size, name)
        self.scale_dtype = dtype  # dtype the steps are saved in and the weight is rebuilt in
        # A narrower float the steps are rounded to in the forward (fp16 for GGUF / fp16 runtimes,
        # whose files hold fp16 steps), so training sees the step the runtime will; None: no rounding.
        self.step_dtype: torch.dtype | None = None
        self.fake_quant_enabled = True
        self.train_mode = "fake_quant"  # see the module docstring; set_train_mode changes it
        self.adapter: nn.Module | None = None
        # Input fake-quantizer (qat.act_quant.ActQuantizer) for W8A8 / W4A8; None: float activations.
        self.act_quant: nn.Module | None = None
        # Online input rotation (qat.online_hadamard.InputHadamard, x -> x V) before act_quant; None: none.
        self.input_hadamard: nn.Module | None = None
        self.source_type = "Linear"
        groups = in_features // self.group_size
        words = packed_width(in_features, spec.storage_bits)
        asym = not spec.symmetric
        frozen = dict(requires_grad=False)
        kw = dict(device=device)
        # Frozen base: Parameters (not buffers) so FSDP2 / DeepSpeed shard them like weights.
        self.base_packed = nn.Parameter(torch.zeros(out_features, words, dtype=torch.int32, **kw), **frozen)
        self.base_scale = nn.Parameter(torch.ones(out_features, groups, **kw), **frozen)
        self.base_zero_point = (
            nn.Parameter(torch.zeros(out_features, groups, **kw), **frozen) if asym else None
        )
        # Trainable steps (fp32 master copy; the forward rounds it to scale_dtype, as saved).
        self.weight_scale = nn.Parameter(torch.ones(out_features, groups, **kw))
        self.weight_zero_point = nn.Parameter(torch.zeros(out_features, groups, **kw)) if asym else None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), **frozen) if bias else None
        self.register_parameter("master_weight", None)  # full_weight mode: trainable float W [out, in]

    # ----------------------------------------------------------------- construction
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, spec: LayerSpec, name: str = "layer") -> "QuantLinear":
        """Quantize a float ``nn.Linear`` / ``Conv1D``: codes at storage_bits, steps at bits."""
        weight = linear.weight.detach()
        if is_conv1d(linear):
            weight = weight.t()  # Conv1D stores [in, out]
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, spec, bias=linear.bias is not None,
            dtype=weight.dtype if weight.is_floating_point() else torch.float32,
            device=weight.device, name=name,
        )
        layer.source_type = "Conv1D" if is_conv1d(linear) else "Linear"
        w = weight.float()
        g = layer.group_size
        grid = layer.base_grid_bits
        base_scale, base_zero = P.init_steps(w, grid, g, spec.symmetric, spec.init)
        codes = P.quantize_codes(w, base_scale, base_zero, grid, g)
        layer.set_base(codes, base_scale, base_zero)
        if grid == spec.bits:
            # Same grid: the steps start at the base's, so W_hat == W0 before training.
            scale, zero = base_scale, base_zero
        else:
            scale, zero = P.init_steps(layer.base_weight(), spec.bits, g, spec.symmetric, spec.init)
        layer.set_steps(scale, zero)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().to(layer.bias.dtype))
        return layer

    @classmethod
    @torch.no_grad()
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        spec: LayerSpec,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        name: str = "layer",
    ) -> "QuantLinear":
        """Rebuild a trainable layer from integer codes [out, in] and steps (e.g. a checkpoint)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, spec, bias=bias is not None, dtype=dtype,
                    device=codes.device, name=name)
        expected = (out_features, in_features // layer.group_size)
        if tuple(scale.shape) != expected:
            raise ValueError(
                f"{name}: weight_scale has shape {tuple(scale.shape)}, expected {expected} for group size "
                f"{layer.group_size}: the checkpoint's scales do not match its config"
            )
        layer.set_base(codes, scale.float(), zero_point)
        layer.set_steps(scale.float(), zero_point)
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
        return layer

    def set_base(self, codes, scale, zero):
        # The Triton pack kernel on CUDA (same bits as qat.packing, which CPU keeps using).
        self.base_packed.copy_(dispatch.pack_int32(codes, self.spec.storage_bits))
        self.base_scale.copy_(scale)
        if self.base_zero_point is not None:
            self.base_zero_point.copy_(zero)

    def set_steps(self, scale, zero):
        self.weight_scale.data.copy_(scale)
        if self.weight_zero_point is not None:
            self.weight_zero_point.data.copy_(zero)

    @torch.no_grad()
    def set_train_mode(self, mode: str, float_weight: torch.Tensor | None = None) -> None:
        """Switch to ``fake_quant``, ``frozen_codes`` or ``full_weight`` (see the module docstring).

        frozen_codes needs the base codes on the trained grid (storage_bits = bits): they are the
        codes that train's steps scale. full_weight starts its master weight from ``float_weight``
        [out, in] (the float model's, when known) or else from W0, and keeps it in fp32.
        """
        if mode not in TRAIN_MODES:
            raise ValueError(f"unknown train_mode {mode!r}: use one of {TRAIN_MODES}")
        if mode == "frozen_codes" and self.base_grid_bits != self.spec.bits:
            raise ValueError(
                f"train_mode 'frozen_codes' scales the base codes, which are stored at {self.spec.storage_bits} "
                f"bits, not the trained {self.spec.bits}: drop storage_bits (or set it equal to bits)")
        if mode == "full_weight":
            w = self.base_weight() if float_weight is None else float_weight.detach().float()
            if tuple(w.shape) != (self.out_features, self.in_features):
                raise ValueError(f"full_weight: float weight has shape {tuple(w.shape)}, expected "
                                 f"{(self.out_features, self.in_features)}")
            self.master_weight = nn.Parameter(w.to(self.base_scale.device).clone())
        else:
            self.master_weight = None
        self.train_mode = mode

    # ----------------------------------------------------------------- weights
    @property
    def base_grid_bits(self) -> float:
        """Grid of the frozen codes: the trained grid when storage matches it (ternary codes
        live in int2 words), else the wider storage grid."""
        same = self.spec.storage_bits == P.container_bits(self.spec.bits)
        return self.spec.bits if same else self.spec.storage_bits

    def base_codes(self) -> torch.Tensor:
        """Frozen base codes [out, in], int8: unpacked on the reference path's every forward and
        backward (the Triton unpack kernel on CUDA, ``qat.packing`` on CPU; the same codes)."""
        return dispatch.unpack_int32(self.base_packed, self.spec.storage_bits, self.in_features)

    def base_weight(self) -> torch.Tensor:
        """W0 = s0 * (q0 - z0), [out, in] fp32."""
        return P.dequantize(self.base_codes(), self.base_scale, self.base_zero_point,
                            self.base_grid_bits, self.group_size)

    def fake_quant_steps(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Cast (autograd-transparent) to the saved dtype so training sees the exported step.
        scale = self.weight_scale
        if self.step_dtype is not None:
            # Value rounded through step_dtype, gradient straight through in fp32 (no fp16
            # underflow of small step gradients); s + (r - s) == r exactly (Sterbenz).
            scale = scale + (scale.to(self.step_dtype).to(scale.dtype) - scale).detach()
        return scale.to(self.scale_dtype), self.weight_zero_point

    def pre_quant_weight(self) -> torch.Tensor:
        """W0 (or the full_weight master W) (+ D for an inside adapter), [out, in] fp32: what
        the fake quantizer rounds."""
        w = self.base_weight() if self.master_weight is None else self.master_weight.float()
        adapter = inside_adapter(self)
        return w if adapter is None else w + adapter.delta_weight().float()

    def fake_quant_weight(self) -> torch.Tensor:
        """W_hat [out, in] in scale_dtype, differentiable w.r.t. steps and inside adapters."""
        w = self.pre_quant_weight()
        if not self.fake_quant_enabled:
            return w.to(self.scale_dtype)
        scale, zero = self.fake_quant_steps()
        if self.train_mode == "frozen_codes":  # the codes stay q0; only s (and z) move
            return P.dequantize_frozen_codes(self.base_codes(), scale, zero, self.spec.bits, self.group_size)
        lsq = P.lsq_grad_scale(self.group_size, self.spec.bits)
        if getattr(self, "slice_bits", None) is not None:  # Matryoshka: the top bits of the int8 codes
            from qat.matryoshka import fake_quantize_slice

            return fake_quantize_slice(w, scale, zero, self.slice_bits, self.group_size, lsq_scale=lsq)
        return P.fake_quantize(w, scale, zero, self.spec.bits, self.group_size, lsq_scale=lsq)

    @torch.no_grad()
    def export_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The forward's last line, frozen: (codes [out, in] int8, scale [out, G], zero point).

        Scale is in scale_dtype (as saved); the zero point is the integer one the forward used.
        The codes come through the same dispatch path as the forward (``dispatch.quant_codes``):
        on the kernel path a plain inside LoRA's D is formed in the kernels, rounding apart
        from torch's ``B @ A``, so the codes must be the kernels' own to be the trained ones.
        """
        if not self.fake_quant_enabled:
            raise RuntimeError("fake quantization is off for this layer: turn it on before exporting")
        scale, zero = self.fake_quant_steps()
        # frozen_codes: the fixed base codes are what the forward scaled (re-rounding W0 / s would
        # not be); the other modes take the forward's own path (kernels bypassed for full_weight).
        codes = self.base_codes() if self.train_mode == "frozen_codes" else dispatch.quant_codes(self)
        zero_int = None if zero is None else P.round_zero_point(zero, self.spec.bits).to(torch.int8)
        return codes, scale.detach().clone(), zero_int

    def trainable_tensors(self) -> list[torch.Tensor]:
        """Tensors W_hat depends on that receive gradients through the recomputed backward."""
        tensors = [self.weight_scale, self.weight_zero_point, self.master_weight]
        adapter = inside_adapter(self)
        if adapter is not None:
            tensors += list(adapter.parameters())
        return [t for t in tensors if t is not None and t.requires_grad]

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_hadamard is not None:
            x = self.input_hadamard(x)  # the weight holds W V already: y = (x V)(W V)^T
        if self.act_quant is not None:
            x = self.act_quant(x)  # the layer (and any adapter) reads the quantized input
        trainables = self.trainable_tensors() if torch.is_grad_enabled() else []
        if trainables or (torch.is_grad_enabled() and x.requires_grad):
            y = _RecomputedLinear.apply(x, self, *trainables)
        else:
            with torch.no_grad():
                y = dispatch.quant_linear(x, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.adapter is not None and self.adapter.placement == "outside":
            y = y + self.adapter(x).to(y.dtype)
        return y

    @torch.no_grad()
    def to_fake_quant_linear(self) -> nn.Linear:
        """A float ``nn.Linear`` holding W_hat (the merged, quantized weight), for comparison.
        Not torchao's ``to_linear`` (which returns the original float weight): the float weight
        before quantization is not kept here, only the packed base."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.scale_dtype, device=self.base_packed.device)
        linear.weight.copy_(dispatch.fake_quant_weight(self))  # the forward's W_hat, on its path
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    # ----------------------------------------------------------------- reporting
    def nbytes_exported(self) -> int:
        """Bytes of the exported tensors: packed codes + steps (+ packed zero points)."""
        words = packed_width(self.in_features, self.spec.export_bits) * self.out_features
        groups = self.weight_scale.numel()
        n = 4 * words + groups * torch.empty(0, dtype=self.scale_dtype).element_size()
        if self.weight_zero_point is not None:
            n += 4 * packed_width(self.out_features, self.spec.export_bits) * (groups // self.out_features)
        return n

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"storage_bits={s.storage_bits}, group_size={self.group_size}, symmetric={s.symmetric}, "
            f"bias={self.bias is not None}"
        )
