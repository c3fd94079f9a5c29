"""Never end worse than the start: score the model on a dev split at step 0, every
``keep_best_steps`` and at the end; keep the best trainable state and leave it in the model.

The score (lower is better), always of the quantized model (fake quantization on):
  task embedding with a teacher   mean over dev examples of 1 - cos(mean-pooled student,
                                  mean-pooled teacher): the sentence-embedding metric reported
  otherwise                       the model's own loss (labels) per counted token on the dev batches
  with matryoshka_widths          sum_r weight_r * (the score above with the model at width r): the
                                  objective the run trains, so a step that helps the int4 / int2 slices
                                  at a small cost to the (near-lossless) int8 model counts as better

Only the trainable tensors (``checkpoint.trainable_state``: steps, zero points, adapters, master
weights, trained biases / norms) change during training, so a snapshot of them is the whole state.
Single-process and data-parallel runs (every rank scores the same dev data and picks the same step);
FSDP2 / ZeRO-3 runs keep the last state (the snapshot would be a gather per evaluation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from qat.quant_linear import QuantLinear
from qat.trainers.checkpoint import trainable_state
from qat.trainers.losses import mean_pool, model_inputs


class KeepBest(TrainerCallback):
    def __init__(self, trainer, dev_dataset, every: int, batch_size: int = 32):
        self.trainer, self.every = trainer, every
        collate = trainer.data_collator
        keep = ("input_ids", "attention_mask", "token_type_ids", "labels")
        rows = [{k: v for k, v in dev_dataset[i].items() if k in keep} for i in range(len(dev_dataset))]
        self.batches = [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        self.teacher_pooled: list[torch.Tensor] | None = None
        self.best_score, self.best_step, self.best_state = float("inf"), None, None
        self.history: list[tuple[int, float]] = []  # (step, dev score)

    # ------------------------------------------------------------------ scoring
    def _embedding_task(self) -> bool:
        return self.trainer.args.task == "embedding" and self.trainer.teacher is not None

    @torch.no_grad()
    def score(self, model) -> float:
        """The dev score of ``model`` as it would be exported (fake quantization forced on); for a
        Matryoshka run, the weighted sum over its widths (as training weighs their losses)."""
        widths = self.trainer.args.matryoshka_widths
        if not widths:
            return self._score_at_width(model)
        from qat.matryoshka import joint_loss

        total, _, _ = joint_loss(model, widths, self.trainer.args.matryoshka_weights,
                                 lambda: (torch.tensor(self._score_at_width(model), dtype=torch.float64), None))
        return float(total)

    @torch.no_grad()
    def _score_at_width(self, model) -> float:
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        was_training, enabled = model.training, [m.fake_quant_enabled for m in layers]
        for m in layers:
            m.fake_quant_enabled = True
        model.eval()
        device = next(model.parameters()).device
        try:
            total, count = 0.0, 0
            for i, batch in enumerate(self.batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                if self._embedding_task():
                    inputs = model_inputs(batch, "embedding")
                    pooled = mean_pool(model(**inputs).last_hidden_state, batch["attention_mask"]).float()
                    cos = F.cosine_similarity(pooled, self._teacher(i, inputs, batch).to(device), dim=-1)
                    total, count = total + float((1 - cos).sum()), count + cos.numel()
                else:
                    tokens = int((batch["labels"][:, 1:] != -100).sum()) if batch["labels"].dim() == 2 else len(batch["labels"])
                    total, count = total + float(model(**batch).loss) * tokens, count + tokens
            return total / max(count, 1)
        finally:
            for m, e in zip(layers, enabled):
                m.fake_quant_enabled = e
            model.train(was_training)

    def _teacher(self, i: int, inputs: dict, batch: dict) -> torch.Tensor:
        if self.teacher_pooled is None:
            self.teacher_pooled = []
        if i == len(self.teacher_pooled):  # the frozen teacher's embeddings, computed once
            out = self.trainer.teacher(**inputs).last_hidden_state
            self.teacher_pooled.append(mean_pool(out, batch["attention_mask"]).float().cpu())
        return self.teacher_pooled[i]

    def _check(self, model, step: int) -> None:
        if self.history and self.history[-1][0] == step:
            return
        s = self.score(model)
        self.history.append((step, s))
        if s < self.best_score:  # ties keep the earlier state
            self.best_score, self.best_step, self.best_state = s, step, trainable_state(model)

    # ------------------------------------------------------------------ Trainer hooks
    def on_train_begin(self, args, state, control, **kw):
        self._check(self.trainer.model, state.global_step)

    def on_step_end(self, args, state, control, **kw):
        if self.every > 0 and state.global_step % self.every == 0:
            self._check(self.trainer.model, state.global_step)

    def on_train_end(self, args, state, control, **kw):
        model = self.trainer.model
        self._check(model, state.global_step)
        if self.best_step != state.global_step:
            missing = set(self.best_state) - set(model.state_dict())
            if missing:
                raise RuntimeError(f"keep_best: the best state's tensors {sorted(missing)[:3]} are not in the model")
            model.load_state_dict(self.best_state, strict=False)
        state.log_history.append({"step": state.global_step, "keep_best_step": self.best_step,
                                  "keep_best_dev_score": self.best_score,
                                  "keep_best_start_score": self.history[0][1]})

    def summary(self) -> dict:
        return {"best_step": self.best_step, "best_dev_score": self.best_score,
                "history": [{"step": st, "dev_score": sc} for st, sc in self.history]}
