"""QATTrainer: transformers.Trainer with qat's optimizer groups, losses, zeroth-order step and checkpoints.

What changes from the Trainer, and only that (everything else - gradient accumulation, evaluation,
report_to, callbacks, resume_from_checkpoint - is the Trainer's own):
  create_optimizer    param groups: adapters (lr, weight decay), steps (step_learning_rate, no decay),
                      zero points (zero_point_learning_rate, no decay), anything else trainable
  compute_loss        task loss, distillation from a frozen teacher, or their mix; stops on a NaN
  training_step       `optim: zo` replaces backward + optimizer with an SPSA step (seed trick)
  _save / _load_*     checkpoints hold the trainable state and the recipe, not the frozen base
  save_model          under FSDP2 / ZeRO-3 every rank gathers that state (collectives), one writes it

FSDP2 (``fsdp_config={"version": 2}``): accelerate shards the model inside ``train()``, after the
optimizer exists; :class:`ShardedSetup` installs the quantized gradient reduce-scatter and checks the
codes once that happened (``on_train_begin``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from qat.adapters import is_adapter_name
from qat.quant_linear import QuantLinear
from qat.trainers import checkpoint as ckpt
from qat.trainers.losses import distill_loss, model_inputs
from qat.trainers.zeroth_order import ZOTensor, zo_step, zo_tensors


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN / inf loss; the message names the step and the last good checkpoint."""


class FakeQuantSchedule(TrainerCallback):
    """Fake quantization off for the first ``start_step`` optimizer steps, then on (and on at the end)."""

    def __init__(self, start_step: int):
        self.start_step = start_step

    @staticmethod
    def _set(model, enabled: bool) -> None:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.fake_quant_enabled = enabled

    def on_step_begin(self, args, state, control, model=None, **kw):
        self._set(model, state.global_step >= self.start_step)

    def on_train_end(self, args, state, control, model=None, **kw):
        self._set(model, True)  # what is exported is always the quantized model


class ShardedSetup(TrainerCallback):
    """Once accelerate has sharded the model with FSDP2: quantized reduce-scatter, codes still int32.

    Not in ``create_optimizer``: for FSDP2 the Trainer builds the optimizer *before*
    ``accelerator.prepare`` shards the model (accelerate then swaps in the sharded parameters).
    """

    def __init__(self, quantized_grads: str | None, seed: int):
        self.quantized_grads, self.seed = quantized_grads, seed

    def on_train_begin(self, args, state, control, model=None, **kw):
        from qat.trainers.fsdp import check_packed_codes, set_quantized_reduce_scatter

        set_quantized_reduce_scatter(model, self.quantized_grads, seed=self.seed)
        check_packed_codes(model)


def parameter_groups(model: torch.nn.Module, args) -> list[dict]:
    """Optimizer groups by role; empty groups dropped. Each group carries its ``name``."""
    lr = args.learning_rate
    step_lr = args.step_learning_rate if args.step_learning_rate is not None else lr
    zp_lr = args.zero_point_learning_rate if args.zero_point_learning_rate is not None else step_lr
    roles = {"adapters": [], "steps": [], "zero_points": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_adapter_name(name):
            roles["adapters"].append(p)
        elif name.endswith("weight_scale"):
            roles["steps"].append(p)
        elif name.endswith("weight_zero_point"):
            roles["zero_points"].append(p)
        else:
            roles["other"].append(p)
    settings = {"adapters": (lr, args.weight_decay), "steps": (step_lr, 0.0),
                "zero_points": (zp_lr, 0.0), "other": (lr, args.weight_decay)}
    groups = [{"name": role, "params": ps, "lr": settings[role][0], "weight_decay": settings[role][1]}
              for role, ps in roles.items() if ps]
    if not groups:
        raise ValueError("nothing to train: attach an adapter (adapter: lora | wht) or set learn_scale: true")
    return groups


class QATTrainer(Trainer):
    def __init__(self, model=None, args=None, teacher: torch.nn.Module | None = None, recipe: dict | None = None,
                 **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        # Our losses are per-token / per-example means: let training_step divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
        self.recipe = recipe if recipe is not None else args.qat_dict()
        if self.is_deepspeed_enabled:  # ZeRO-3 must gather each QuantLinear together with its adapter
            from qat.trainers.deepspeed_utils import prepare_for_deepspeed

            prepare_for_deepspeed(self.model)
        self._check_engine_enabled()
        self._check_quantized_grads()
        if self.is_fsdp_enabled:
            self.add_callback(ShardedSetup(args.quantized_grads, args.seed))
        self.add_callback(FakeQuantSchedule(args.fake_quant_start_step))
        self._zo: list[ZOTensor] | None = None
        self._zo_micro = (-1, 0)  # (global step, micro-batch index) for the perturbation seed

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(model, self.args)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _check_engine_enabled(self) -> None:
        """Refuse, before training, the two ways accelerate silently runs another job than asked.

        accelerate adopts an FSDP request only on the device types it lists (CUDA, XPU, NPU, ...): on
        CPU processes (``use_cpu``: MULTI_CPU) it drops it and the Trainer trains with DDP, every rank
        holding the whole model; likewise DeepSpeed under ``accelerate launch --cpu``. And where
        accelerate finds no device backend it counts one process while DeepSpeed has started all of
        them (DeepSpeed's CPU accelerator without ``use_cpu``).
        """
        why = {"fsdp": "accelerate adopts FSDP only on GPUs and other accelerators, not on CPU processes: "
                       "launch on GPUs, or drop fsdp to train with DDP",
               "deepspeed": "accelerate drops DeepSpeed on a run it was told is CPU-only (accelerate launch "
                            "--cpu, ACCELERATE_USE_CPU): launch without --cpu (on CPU processes: "
                            "DS_ACCELERATOR=cpu and use_cpu: true), or drop deepspeed"}
        for asked, name, enabled in ((self.args.fsdp, "fsdp", self.is_fsdp_enabled),
                                     (self.args.deepspeed, "deepspeed", self.is_deepspeed_enabled)):
            if asked and not enabled and not self.is_fsdp_xla_enabled:  # XLA FSDP is not accelerate's
                raise ValueError(f"{name} was requested but accelerate runs this job as "
                                 f"{self.accelerator.distributed_type.value}: {why[name]}")
        started = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.is_deepspeed_enabled and started != self.accelerator.num_processes:
            raise ValueError(
                f"DeepSpeed started {started} processes but accelerate counts {self.accelerator.num_processes} "
                "(it found no GPU backend): on CPU processes (DS_ACCELERATOR=cpu) set use_cpu: true")

    def _check_quantized_grads(self) -> None:
        """quantized_grads is an FSDP2 hook: refuse it at construction on any other engine."""
        if self.args.quantized_grads is None:
            return
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if not self.is_fsdp_enabled or getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError("quantized_grads needs FSDP2 (fsdp_config version 2, or accelerate launch "
                             "--config_file scripts/accelerate/fsdp2.yaml); under DeepSpeed use "
                             "zero_quantized_gradients")

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.matryoshka_widths:  # one forward per width; the weighted sum of their losses
            from qat.matryoshka import joint_loss

            loss, outputs, _ = joint_loss(model, self.args.matryoshka_widths, self.args.matryoshka_weights,
                                          lambda: self.single_width_loss(model, inputs, True))
            self._stop_if_not_finite(loss)
            return (loss, outputs) if return_outputs else loss
        return self.single_width_loss(model, inputs, return_outputs)

    def single_width_loss(self, model, inputs, return_outputs=False):
        args = self.args
        outputs = model(**model_inputs(inputs, args.task))
        task_loss = None if args.task == "embedding" else outputs.loss
        loss = task_loss
        if self.teacher is not None and args.distill != "none":
            with torch.no_grad():
                teacher_out = self.teacher(**model_inputs(inputs, args.task))
            d = distill_loss(args.distill, args.task, outputs, teacher_out, inputs, args.distill_temperature)
            loss = d if task_loss is None else (1 - args.distill_weight) * task_loss + args.distill_weight * d
        if loss is None:
            raise ValueError(f"task {args.task!r} gave no loss: the batch has no labels and no teacher is set")
        self._stop_if_not_finite(loss)
        return (loss, outputs) if return_outputs else loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss.detach()).all():
            return
        step = self.state.global_step + 1
        out = self.args.output_dir
        kept = get_last_checkpoint(out) if Path(out).is_dir() else None
        where = f"the last good checkpoint is {kept} (resume with --resume_from_checkpoint {kept})" if kept \
            else "no checkpoint had been saved yet"
        raise NonFiniteLossError(
            f"loss became {loss.item()} at step {step}; training stopped and nothing after it was saved; {where}. "
            "Try a lower learning_rate or step_learning_rate, max_grad_norm 1.0, warmup_steps, "
            "or fake_quant_start_step > 0; with fp16, try bf16 or fp32.")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.args.task != "embedding":
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # Encoders have no labels, so the Trainer would skip the loss: evaluate the distillation loss.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ zeroth-order
    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.zeroth_order:
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = self._prepare_inputs(inputs)
        if self._zo is None:
            self._zo = self._zo_tensor_list(model)
        step, micro = self._zo_micro
        micro = micro + 1 if step == self.state.global_step else 0
        self._zo_micro = (self.state.global_step, micro)
        # The same seed on every rank and on a resumed run: derived from the recipe seed and the position.
        seed = (self.args.seed * 1_000_003 + self.state.global_step) * 101 + micro
        model.eval()  # dropout off during the two forwards (MeZO)
        accumulation = self.current_gradient_accumulation_steps
        loss = zo_step(self._zo, lambda: self.compute_loss(model, inputs), seed, self.args.zo_eps,
                       self.args.zo_num_perturbations, self.optimizer.param_groups, self.args.zo_clip,
                       lr_scale=1.0 / accumulation)
        model.train()
        return (loss.float() / accumulation).to(self.args.device)

    def _zo_tensor_list(self, model) -> list[ZOTensor]:
        group_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        return [ZOTensor(p, group_of[id(p)], relative) for _, p, relative in zo_tensors(model, self.args.zo_targets)]

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not ckpt.is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        # FSDP2 / ZeRO-3: the Trainer would gather the whole model to rank 0 (FSDP FULL_STATE_DICT,
        # ZeRO-3 with stage3_gather_16bit_weights_on_model_save) or hand _save an empty state dict on
        # rank 0 alone (ZeRO-3 without), or save none of ours (FSDP SHARDED_STATE_DICT). The engines'
        # own checkpoints for resuming are written with the optimizer either way. Here every rank
        # gathers the trainable tensors and fingerprints the codes layer by layer; rank 0 writes.
        contents = ckpt.checkpoint_contents(self.model)
        self._write_checkpoint(output_dir if output_dir is not None else self.args.output_dir, *contents)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self._write_checkpoint(output_dir if output_dir is not None else self.args.output_dir,
                               *ckpt.checkpoint_contents(model, state_dict))

    def _write_checkpoint(self, output_dir: str, state: dict, bases: dict) -> None:
        if not self.args.should_save:
            return
        ckpt.write_checkpoint(output_dir, state, bases, self.recipe)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, str(Path(output_dir) / "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not ckpt.is_qat_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        ckpt.load_checkpoint(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not ckpt.is_qat_checkpoint(best):
            return super()._load_best_model()
        ckpt.load_checkpoint(self.model, best)
