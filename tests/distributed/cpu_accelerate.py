"""Test-only: let accelerate (hence the Trainer) run FSDP2 on CPU processes with gloo.

Where accelerate 1.15 refuses (read in ``accelerate/state.py``):

- ``PartialState._prepare_backend``: under ``torchrun`` (LOCAL_RANK set) a distributed type is
  chosen only for an accelerator (CUDA, XPU, ...); on a CPU-only machine it stays ``NO`` unless
  ``cpu=True`` (``TrainingArguments(use_cpu=True)``), which gives ``MULTI_CPU`` with gloo. With
  ``NO`` the Trainer stops at "Using fsdp only works in distributed training."
- ``AcceleratorState.__init__``: the ``fsdp_plugin`` is adopted (``distributed_type = FSDP``) only
  inside ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`` - MULTI_CPU
  is not in that list, so with ``use_cpu=True`` the plugin is silently dropped and the Trainer
  trains with DDP instead.

:func:`allow_fsdp_on_cpu` adds MULTI_CPU to that list and nothing else: after the original
``__init__`` it does what the skipped branch would have done. Everything downstream - the
Trainer's FSDP2 path, ``accelerate``'s ``fsdp2_prepare_model`` / ``fully_shard`` on the default
CPU mesh, its checkpointing - runs unmodified.
"""

from __future__ import annotations


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_qat_cpu_fsdp", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # the body of the skipped `elif` (state.py, "self.distributed_type = DistributedType.FSDP")
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    init._qat_cpu_fsdp = True
    AcceleratorState.__init__ = init


def allow_deepspeed_on_cpu() -> None:
    """The same for DeepSpeed: ``AcceleratorState.__init__`` adopts the DeepSpeed plugin only under
    ``elif ACCELERATE_USE_DEEPSPEED == "true" and not cpu`` (state.py). Without ``use_cpu`` the
    Trainer does reach DeepSpeed (``deepspeed.comm`` starts gloo on DeepSpeed's CPU accelerator),
    but accelerate's ``PartialState`` found no accelerator, hence no backend, and counts one process
    ("No backend == no distributed training"): the batch "auto" values then disagree with
    DeepSpeed's world size of 2. With ``use_cpu=True`` (MULTI_CPU, gloo) this adds the skipped branch.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_qat_cpu_deepspeed", False):
        return

    def init(self, *args, deepspeed_plugin=None, **kwargs):
        original(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if deepspeed_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # the body of the skipped branch (state.py, "self.distributed_type = DistributedType.DEEPSPEED")
            self.distributed_type = DistributedType.DEEPSPEED
            plugins = deepspeed_plugin.values() if isinstance(deepspeed_plugin, dict) else [deepspeed_plugin]
            for plugin in plugins:
                plugin.set_mixed_precision(self._mixed_precision)
            next(iter(plugins)).select(_from_accelerator_state=True)
            self._mixed_precision = "no"  # DeepSpeed's config owns precision (as accelerate does)
            self.deepspeed_plugins = deepspeed_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    init._qat_cpu_deepspeed = True
    AcceleratorState.__init__ = init
