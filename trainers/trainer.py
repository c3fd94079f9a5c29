"""QATTrainer: transformers.Trainer with qat's optimizer groups, losses, zeroth-order step and checkpoints.

What changes from the Trainer, and only that (everything else - gradient accumulation, evaluation,
report_to, callbacks, resume_from_checkpoint - is the Trainer's own):
  create_optimizer    param groups: adapters (lr, weight decay), steps (step_learning_rate, no decay;
                      step_lr_relative: one group per layer, relative to its mean step),
                      zero points (zero_point_learning_rate, no decay), anything else trainable
  compute_loss        task loss, distillation from a frozen teacher, or their mix; stops on a NaN
  training_step       `optim: zo` replaces backward + optimizer with an SPSA step (seed trick)
  _save / _load_*     checkpoints hold the trainable state and the recipe, not the frozen base
  _save_checkpoint    written into a hidden folder and renamed into place whole; a diverged state
                      (NaN / inf, overflow, step <= 0) is refused; rotation keeps the newest, the
                      best and the lowest-training-loss checkpoints
  save_model          called by the user (or push_to_hub): the packed export from_pretrained loads, with
                      the tokenizer; for checkpoint-N folders: the trainable state (under FSDP2 / ZeRO-3
                      every rank gathers it, one writes it)
  __init__            takes plain TrainingArguments too (qat's keys at their defaults), finds the float
                      teacher, refuses a trainable parameter outside the steps and adapters (switch.py)

FSDP2 (``fsdp_config={"version": 2}``): accelerate shards the model inside ``train()``, after the
optimizer exists; :class:`ShardedSetup` installs the quantized gradient reduce-scatter and checks the
codes once that happened (``on_train_begin``).
"""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from qat.adapters import is_adapter_name
from qat.quant_linear import QuantLinear
from qat.train_modes import bias_and_norm_names
from qat.trainers import checkpoint as ckpt
from qat.trainers.keep_best import KeepBest
from qat.trainers.arguments import QATArguments
from qat.trainers.losses import distill_loss, model_inputs
from qat.trainers.switch import as_qat_arguments, check_trainable, export_into, resolve_teacher
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


def parameter_role(name: str) -> str:
    """The optimizer group of a parameter: 'adapters', 'steps', 'zero_points' or 'other'."""
    if is_adapter_name(name):
        return "adapters"
    if name.endswith(("weight_scale", "act_quant.scale")):  # weight and static activation steps
        return "steps"
    if name.endswith("weight_zero_point"):
        return "zero_points"
    if name.endswith("master_weight"):  # train_mode full_weight (qat.train_modes)
        return "master_weights"
    return "other"


def parameter_groups(model: torch.nn.Module, args) -> list[dict]:
    """Optimizer groups by role; empty groups dropped. Each group carries its ``name``."""
    lr = args.learning_rate
    step_lr = args.step_learning_rate if args.step_learning_rate is not None else lr
    zp_lr = args.zero_point_learning_rate if args.zero_point_learning_rate is not None else step_lr
    roles = {"adapters": [], "steps": [], "zero_points": [], "master_weights": [], "other": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            roles[parameter_role(name)].append(p)
    settings = {"adapters": (lr, args.weight_decay), "steps": (step_lr, 0.0),
                "zero_points": (zp_lr, 0.0), "master_weights": (lr, args.weight_decay), "other": (lr, args.weight_decay)}
    relative = getattr(args, "step_lr_relative", False)  # plain TrainingArguments (benchmarks) have none
    groups = [{"name": role, "params": ps, "lr": settings[role][0], "weight_decay": settings[role][1]}
              for role, ps in roles.items() if ps and not (relative and role == "steps")]
    if relative:  # one group per step tensor: Adam moves each by ~lr a step, so lr = fraction * its mean step
        groups += [{"name": "steps", "params": [p], "lr": step_lr * float(p.detach().abs().mean()),
                    "weight_decay": 0.0} for p in roles["steps"]]
    if not groups:
        raise ValueError("nothing to train: attach an adapter (adapter: lora | wht) or set learn_scale: true")
    return groups


def disable_dropout(model: torch.nn.Module) -> None:
    """p = 0 on every nn.Dropout (attention modules that read ``self.dropout.p`` follow)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class QATTrainer(Trainer):
    args_class = QATArguments  # what plain TrainingArguments are turned into (TRL: QATSFTConfig)
    # False only for benchmarks that train other tools' models (QLoRA, torchao) with qat's loss:
    # no QuantLinear there, and their peft adapters are what trains.
    checks_qat_model = True

    def __init__(self, model=None, args=None, teacher: torch.nn.Module | None = None, recipe: dict | None = None,
                 dev_dataset=None, **kwargs):
        if model is None:
            raise ValueError("QATTrainer needs model= (a model prepared by qat.get_qat_model or qat.quantize_model)")
        if self.checks_qat_model and not any(isinstance(m, QuantLinear) for m in model.modules()):
            raise ValueError("the model has no quantized layers: prepare it with qat.get_qat_model(model, lora_config, "
                             "bits=4, group_size=32) (or give QATSFTTrainer peft_config=)")
        args = as_qat_arguments(args, model, self.args_class)
        teacher = resolve_teacher(model, teacher, args)  # before anything is frozen or moved
        asked = set(bias_and_norm_names(model, args.train_biases, args.train_norms))  # the recipe trains these
        if self.checks_qat_model:
            check_trainable(model, lambda name: "recipe" if name in asked else parameter_role(name))
        parameter_groups(model, args)  # "nothing to train" now, not at the first step
        if args.disable_dropout:
            disable_dropout(model)
        super().__init__(model=model, args=args, **kwargs)
        # Our losses are per-token / per-example means: let training_step divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher
        self._loss_parts: list[tuple[float, float]] = []  # (task, distill) per training micro-batch, until logged
        self._saving_checkpoint = False
        self._in_training_step = False
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
        self.keep_best = self._keep_best_callback(dev_dataset)
        self._zo: list[ZOTensor] | None = None
        self._zo_micro = (-1, 0)  # (global step, micro-batch index) for the perturbation seed

    def _keep_best_callback(self, dev) -> KeepBest | None:
        """keep_best (on by default) scores ``dev_dataset`` (tokenised rows; the main job passes its
        held-out split) at step 0, every keep_best_steps and at the end, and leaves the best state in
        the model; off without one or when sharded (Trainer-API users get the Trainer's own behaviour)."""
        usable = dev is not None and hasattr(dev, "__len__") and not isinstance(dev, dict) and len(dev) > 0
        if not (self.args.keep_best and usable) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None
        callback = KeepBest(self, dev, self.args.keep_best_steps, self.args.per_device_eval_batch_size)
        self.add_callback(callback)
        return callback

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
        # hidden_mse distils every layer's output: both models return their hidden states.
        extra = {"output_hidden_states": True} if args.distill == "hidden_mse" and self.teacher is not None else {}
        outputs = model(**model_inputs(inputs, args.task), **extra)
        task_loss = None if args.task == "embedding" else outputs.loss
        loss = task_loss
        if self.teacher is not None and args.distill != "none":
            with torch.no_grad():
                teacher_out = self.teacher(**model_inputs(inputs, args.task), **extra)
            d = distill_loss(args.distill, args.task, outputs, teacher_out, inputs, args.distill_temperature)
            loss = d if task_loss is None else (1 - args.distill_weight) * task_loss + args.distill_weight * d
            if self._in_training_step:  # not evaluation
                self._loss_parts.append((float("nan") if task_loss is None else task_loss.item(), d.item()))
        if loss is None:
            raise ValueError(f"task {args.task!r} gave no loss: the batch has no labels and no teacher is set")
        self._stop_if_not_finite(loss)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs carry the task and distillation losses apart (means since the last log) and the weight."""
        if "loss" in logs and self._loss_parts:
            task, distill = (sum(v) / len(v) for v in zip(*self._loss_parts))
            logs.update(task_loss=task, distill_loss=distill, distill_weight=self.args.distill_weight)
            self._loss_parts.clear()
        super().log(logs, start_time)

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss.detach()).all():
            return
        step = self.state.global_step + 1
        raise NonFiniteLossError(
            f"loss became {loss.item()} at step {step}; training stopped and nothing after it was saved; "
            f"{self._last_good(self.state.global_step)}. Try a lower learning_rate or step_learning_rate, "
            "max_grad_norm 1.0, warmup_steps, or fake_quant_start_step > 0; with fp16, try bf16 or fp32.")

    def _last_good(self, diverged_at: int) -> str:
        """Where to resume after the weights of step ``diverged_at`` failed: checkpoint-<diverged_at>
        holds those very weights, so the last good one is the newest complete checkpoint before it."""
        kept, _ = ckpt.newest_complete_checkpoint(self.args.output_dir, before=diverged_at, deep=False)
        if kept is None:
            return "no good checkpoint had been saved yet"
        return f"the last good checkpoint is {kept} (resume with --resume_from_checkpoint {kept})"

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
        self._in_training_step = True
        try:
            return self._training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False

    def _training_step(self, model, inputs, num_items_in_batch=None):
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
        if not self._saving_checkpoint:  # the user's save_model(dir) or push_to_hub(): the packed export
            self._save_export(output_dir if output_dir is not None else self.args.output_dir)
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        if not ckpt.is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        # FSDP2 / ZeRO-3: the Trainer would gather the whole model to rank 0 (FSDP FULL_STATE_DICT,
        # ZeRO-3 with stage3_gather_16bit_weights_on_model_save) or hand _save an empty state dict on
        # rank 0 alone (ZeRO-3 without), or save none of ours (FSDP SHARDED_STATE_DICT). The engines'
        # own checkpoints for resuming are written with the optimizer either way. Here every rank
        # gathers the trainable tensors and fingerprints the codes layer by layer; rank 0 writes.
        contents = ckpt.checkpoint_contents(self.model)
        self._write_checkpoint(output_dir if output_dir is not None else self.args.output_dir, *contents)

    def _save_export(self, folder: str) -> None:
        """The packed compressed-tensors export (+ tokenizer) into ``folder``, beside what is there;
        outside LoRA also in peft's format in ``folder/adapter``. Sharded: every rank gathers, rank 0 writes."""
        import qat
        from qat.adapters import export_with_peft
        from qat.trainers.sharded_export import export_sharded

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        tokenizer = self.processing_class if hasattr(self.processing_class, "save_pretrained") else None
        kw = dict(tokenizer=tokenizer, recipe=self.args.qat_dict(), base_model=getattr(model, "name_or_path", None))
        sharded = ckpt.is_sharded(self.model)
        outside = any(isinstance(m, QuantLinear) and m.adapter is not None and m.adapter.placement == "outside"
                      for m in model.modules())
        if sharded and outside:
            raise ValueError("sharded runs export inside adapters only (outside LoRA: train with DDP)")

        def write(target: Path) -> None:
            if sharded:
                export_sharded(self.model, target, **kw)
            elif outside:
                export_with_peft(model, target, target / "adapter", **kw)
            else:
                qat.export_model(model, target, **kw)

        if not self.args.should_save:
            if sharded:  # this rank takes part in the gathers; rank 0 writes
                write(Path(folder) / ".qat-export-unused")
            return
        export_into(folder, write)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self._write_checkpoint(output_dir if output_dir is not None else self.args.output_dir,
                               *ckpt.checkpoint_contents(model, state_dict))

    def _write_checkpoint(self, output_dir: str, state: dict, bases: dict) -> None:
        if not self.args.should_save:
            return
        problem = ckpt.state_problem(state)
        if problem:  # what is saved must be resumable: a diverged state is refused, not kept as "good"
            raise NonFiniteLossError(
                f"training diverged by step {self.state.global_step}: {problem}; it was not saved; "
                f"{self._last_good(self.state.global_step)}. Try a lower learning_rate or step_learning_rate, "
                "max_grad_norm 1.0 or warmup_steps.")
        bad, total = ckpt.nonpositive_steps(state)
        if bad:  # consistent with the export, but a sign that step_learning_rate is too high
            print(f"qat: warning: {bad} of {total} step sizes are <= 0 at step {self.state.global_step} (they "
                  "crossed zero: step_learning_rate is too high for them); lower step_learning_rate",
                  file=sys.stderr)
        ckpt.write_checkpoint(output_dir, state, bases, self.recipe)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, str(Path(output_dir) / "training_args.bin"))

    # ------------------------------------------------------------------ atomic checkpoints, rotation
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into ``<run>/.checkpoint-N.partial/checkpoint-N`` (every
        rank writes there: the Trainer asks ``_get_output_dir``) and renamed into place once whole."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".{name}.partial"
        self._staging_dir = str(staging)
        self._saving_checkpoint = True  # save_model inside writes the trainable state, not an export
        try:
            super()._save_checkpoint(model, trial)  # its rotation runs inside the staging folder: a no-op
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # a refused or failed save leaves nothing behind
            raise
        finally:
            self._staging_dir = None
            self._saving_checkpoint = False
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's files (optimizer shards, engine states) are in
        if self.args.should_save:
            self._publish_checkpoint(staging, run_dir / name)
            self._rotate(run_dir)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank goes on before checkpoint-N exists under its final name

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging else super()._get_output_dir(trial)

    def _publish_checkpoint(self, staging: Path, final: Path) -> None:
        staged = staging / final.name
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staging:  # the Trainer recorded the staging path of this step
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / ckpt.TRAINER_STATE_FILE))
        ckpt.write_manifest(staged)  # last: a checkpoint without it never finished
        if final.exists():  # the same step saved again: the new one replaces it only once whole
            old = staging / "replaced"
            final.rename(old)
        staged.rename(final)
        shutil.rmtree(staging, ignore_errors=True)

    def _rotate(self, run_dir: Path) -> None:
        """save_total_limit, keeping out of rotation the newest checkpoint (to resume), the Trainer's
        best and the one with the lowest logged training loss (the last good one when a run blows up
        without a NaN: rotation would otherwise delete every early checkpoint)."""
        limit = self.args.save_total_limit
        found = ckpt.sorted_checkpoints(run_dir)
        if not limit or limit <= 0 or len(found) <= limit:
            return
        protected = {found[-1].resolve(), self._lowest_loss_checkpoint(found)}
        if self.state.best_model_checkpoint:
            protected.add(Path(self.state.best_model_checkpoint).resolve())
        excess = len(found) - max(limit, len(protected - {None}))
        for folder in found:
            if excess <= 0:
                break
            if folder.resolve() not in protected:
                shutil.rmtree(folder, ignore_errors=True)
                excess -= 1

    def _lowest_loss_checkpoint(self, found: list[Path]) -> Path | None:
        """The checkpoint whose last logged training loss (at or before its step) is lowest."""
        logged = [(h["step"], h["loss"]) for h in self.state.log_history if "loss" in h and "step" in h]
        scored = []
        for folder in found:
            before = [loss for step, loss in logged if step <= ckpt.checkpoint_step(folder)]
            if before:
                scored.append((before[-1], folder.resolve()))
        return min(scored)[1] if scored else None

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
            raise ValueError(f"the optimizer state in {checkpoint} could not be loaded ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}): the file is corrupt or from "
                             "another recipe; resume from an earlier checkpoint-* folder") from None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not ckpt.is_qat_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        ckpt.load_checkpoint(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not ckpt.is_qat_checkpoint(best):
            return super()._load_best_model()
        ckpt.load_checkpoint(self.model, best)
