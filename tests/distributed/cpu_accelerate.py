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
``__init__`` it runs the skipped branch's own statements (``ADOPTION_BRANCH``, checked against
the installed accelerate by test_cpu_accelerate.py). Everything downstream - the
Trainer's FSDP2 path, ``accelerate``'s ``fsdp2_prepare_model`` / ``fully_shard`` on the default
CPU mesh, its checkpointing - runs unmodified.

DeepSpeed needs no lift: ``AcceleratorState`` adopts the DeepSpeed plugin under
``elif ACCELERATE_USE_DEEPSPEED == "true" and not cpu``, and the Trainer builds its ``Accelerator``
without ``cpu=True`` even when ``use_cpu`` is set, so ``use_cpu=True`` + ``deepspeed=...`` with
``DS_ACCELERATOR=cpu`` runs ZeRO-3 on gloo as released. Without ``use_cpu`` ``PartialState`` finds
no accelerator, hence no backend, and counts one process ("No backend == no distributed
training") while ``deepspeed.comm`` has started two: QATTrainer refuses that mismatch.
"""

from __future__ import annotations

import contextlib


# The body of accelerate's FSDP-adoption branch (AcceleratorState.__init__, accelerate 1.16,
# state.py) that MULTI_CPU never reaches, statement for statement. The copy below runs exactly
# this; test_cpu_accelerate.py fails when accelerate's own branch stops matching it.
ADOPTION_BRANCH = """
self.distributed_type = DistributedType.FSDP
if self._mixed_precision != "no" and fsdp_plugin is not None:
    fsdp_plugin.set_mixed_precision(self._mixed_precision)
self.fsdp_plugin = fsdp_plugin
"""


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_qat_cpu_fsdp", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            exec(ADOPTION_BRANCH, {"DistributedType": DistributedType},
                 {"self": self, "fsdp_plugin": fsdp_plugin})
            PartialState._shared_state["distributed_type"] = self.distributed_type

    init._qat_cpu_fsdp = True
    init.unpatched = original
    AcceleratorState.__init__ = init


@contextlib.contextmanager
def accelerate_as_shipped():
    """Within the block accelerate behaves as released (the lift above undone)."""
    from accelerate.state import AcceleratorState

    patched = AcceleratorState.__init__
    AcceleratorState.__init__ = getattr(patched, "unpatched", patched)
    try:
        yield
    finally:
        AcceleratorState.__init__ = patched
