"""Losses: the task loss the model computes, distillation from a frozen teacher, and their mix.

    loss = (1 - w) * task + w * distill        (w = distill_weight; task 'embedding' is distill only)

distill:
  kl      causal LM / classification logits: T^2 * KL(softmax(t/T) || softmax(s/T)) per token
  mse     logits (causal LM / classification) or token hidden states (embedding)
  cosine  embedding: 1 - cos(mean-pooled student, mean-pooled teacher), the sentence-embedding metric
  hidden_mse  any task: per-token MSE of every layer's output hidden state, each layer divided by
          the variance of the teacher's (see :func:`hidden_state_mse`)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qat.trainers.data import IGNORE_INDEX


def token_mask(inputs: dict) -> torch.Tensor:
    """[B, T] bool: tokens that count (answer tokens when labels mask the prompt, else non-padding)."""
    labels = inputs.get("labels")
    if labels is not None and labels.dim() == 2:
        return labels != IGNORE_INDEX
    mask = inputs.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones(inputs["input_ids"].shape, dtype=torch.bool,
                                                           device=inputs["input_ids"].device)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B, H], the all-MiniLM-L6-v2 / sentence-transformers pooling."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over masked positions of T^2 KL(p_teacher || p_student); logits [..., V], mask [...]."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_pos = (t.exp() * (t - s)).sum(-1)  # [...]
    return (per_pos * mask).sum() / mask.sum().clamp_min(1) * temperature ** 2


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element over masked positions; tensors [B, T, D], mask [B, T]."""
    err = (student.float() - teacher.float()).pow(2).mean(-1)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def hidden_state_mse(student: tuple, teacher: tuple, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token, per-layer hidden-state distillation, normalised per layer:

        L = 1/L_n sum_l [ sum_{b,t in mask} mean_h (S_l - T_l)^2 / N ] / var_l

    over the layers' outputs ``hidden_states[1:]`` (index 0, the embeddings, is not quantized),
    each [B, T, H]; N = masked tokens; var_l = variance of the teacher's layer-l values over the
    masked tokens and all features (detached: a scale, not a target). Dividing by var_l gives
    each layer the same weight whatever its activation scale (deep layers grow large).
    """
    mask = attention_mask.bool()                                    # [B, T]
    layers = list(zip(student[1:], teacher[1:]))
    if not layers:
        raise ValueError("hidden_mse needs hidden states: the model returned none (output_hidden_states)")
    n_tok = mask.sum().clamp_min(1)
    total = 0.0
    for s, t in layers:
        t = t.float()
        err = (s.float() - t).pow(2).mean(-1)                        # [B, T]
        tv = t[mask]                                                  # [N, H]
        var = tv.var(unbiased=False).detach().clamp_min(1e-12)
        total = total + (err * mask).sum() / n_tok / var
    return total / len(layers)


def distill_loss(kind: str, task: str, student_out, teacher_out, inputs: dict, temperature: float) -> torch.Tensor:
    if kind == "hidden_mse":
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(inputs["input_ids"].shape, dtype=torch.bool, device=inputs["input_ids"].device)
        return hidden_state_mse(student_out.hidden_states, teacher_out.hidden_states, mask)
    if task == "embedding":
        s, t = student_out.last_hidden_state, teacher_out.last_hidden_state  # [B, T, H]
        mask = inputs["attention_mask"]
        if kind == "cosine":
            return (1 - F.cosine_similarity(mean_pool(s, mask).float(), mean_pool(t, mask).float(), dim=-1)).mean()
        return masked_mse(s, t, mask.bool())
    s, t = student_out.logits, teacher_out.logits
    if task == "seq_cls":  # [B, C]: one position per example
        mask = torch.ones(s.shape[:-1], device=s.device)
    else:  # position i predicts token i+1: distil where the next token counts
        counted = token_mask(inputs).to(s.dtype)
        mask = torch.zeros_like(counted)
        mask[:, :-1] = counted[:, 1:]
    if kind == "kl":
        return kl_logits(s, t, mask, temperature)
    if kind == "mse":
        return masked_mse(s if s.dim() == 3 else s[:, None], t if t.dim() == 3 else t[:, None],
                          mask if mask.dim() == 2 else mask[:, None])
    raise ValueError(f"distill {kind!r} does not apply to task {task!r}")


def model_inputs(inputs: dict, task: str) -> dict:
    """What the model's forward takes: encoders get no labels (AutoModel has no head to use them)."""
    if task == "embedding":
        return {k: v for k, v in inputs.items() if k != "labels"}
    return inputs
