"""Distillation losses against float64 formulas."""

import math
from types import SimpleNamespace

import torch

from qat.trainers.losses import distill_loss, kl_logits, mean_pool


def test_kl_matches_float64_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.float32)
    T = 2.0
    expected, n = 0.0, 0
    for b in range(2):
        for i in range(5):
            if mask[b, i]:
                p = torch.softmax(t[b, i].double() / T, -1)
                q = torch.softmax(s[b, i].double() / T, -1)
                expected += float((p * (p.log() - q.log())).sum())
                n += 1
    expected = expected / n * T * T
    # fp32 log-softmax on 7 logits: relative error ~1e-6; 1e-5 leaves a margin.
    assert math.isclose(kl_logits(s, t, mask, T).item(), expected, rel_tol=1e-5)
    assert kl_logits(t, t, mask, T).abs().item() < 1e-6  # KL(p || p) = 0


def test_causal_kl_uses_positions_that_predict_counted_tokens():
    torch.manual_seed(1)
    s, t = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 4]])  # the answer is tokens 2 and 3: predicted at positions 1, 2
    got = distill_loss("kl", "causal_lm", SimpleNamespace(logits=s), SimpleNamespace(logits=t),
                       {"labels": labels}, 1.0)
    want = kl_logits(s[:, 1:3], t[:, 1:3], torch.ones(1, 2), 1.0)
    assert torch.allclose(got, want, atol=1e-7)


def test_cosine_embedding_loss_is_one_minus_pooled_cosine():
    torch.manual_seed(2)
    hs, ht = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 1 + [0] * 5])
    got = distill_loss("cosine", "embedding", SimpleNamespace(last_hidden_state=hs),
                       SimpleNamespace(last_hidden_state=ht), {"attention_mask": mask}, 1.0)
    want = []
    for b in range(3):
        n = int(mask[b].sum())
        a, c = hs[b, :n].double().mean(0), ht[b, :n].double().mean(0)
        want.append(1 - float(a @ c / (a.norm() * c.norm())))
    assert math.isclose(got.item(), sum(want) / 3, rel_tol=1e-5)  # fp32 pooling of 6x8 values
    pooled = mean_pool(hs, mask)
    assert torch.allclose(pooled[2], hs[2, 0])  # padding never enters the pooled embedding


def test_mse_on_hidden_states_and_on_logits_ignores_padding():
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    got = distill_loss("mse", "embedding", SimpleNamespace(last_hidden_state=s),
                       SimpleNamespace(last_hidden_state=t), {"attention_mask": mask}, 1.0)
    kept = mask.bool()
    want = ((s[kept].double() - t[kept].double()) ** 2).mean()  # mean over kept tokens and features
    assert math.isclose(got.item(), want.item(), rel_tol=1e-6)
    cls = distill_loss("mse", "seq_cls", SimpleNamespace(logits=s[:, 0]), SimpleNamespace(logits=t[:, 0]), {}, 1.0)
    assert math.isclose(cls.item(), ((s[:, 0] - t[:, 0]) ** 2).mean().item(), rel_tol=1e-6)


def test_hidden_mse_matches_float64_per_layer_per_token_formula():
    from qat.trainers.losses import hidden_state_mse

    torch.manual_seed(3)
    B, T, H, L = 2, 5, 6, 3
    # hidden_states[0] (embeddings) differs on purpose: it is not part of the loss
    student = tuple(torch.randn(B, T, H) * (l + 1) for l in range(L + 1))
    teacher = tuple(torch.randn(B, T, H) * (l + 1) + 0.5 for l in range(L + 1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = 0.0
    for l in range(1, L + 1):
        kept = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
        tv = torch.stack([teacher[l][b, t].double() for b, t in kept])           # [N, H]
        var = float(((tv - tv.mean()) ** 2).mean())                                 # over tokens and features
        err = sum(float(((student[l][b, t].double() - teacher[l][b, t].double()) ** 2).mean()) for b, t in kept)
        expected += err / len(kept) / var
    expected /= L
    got = distill_loss("hidden_mse", "embedding", SimpleNamespace(hidden_states=student),
                       SimpleNamespace(hidden_states=teacher), {"attention_mask": mask}, 1.0)
    # fp32 sums of ~50 squared differences per layer vs float64: relative error ~1e-6.
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    # padding does not count: changing a masked-out token's student state leaves the loss unchanged
    moved = tuple(s.clone() for s in student)
    moved[2][0, 4] += 100.0
    again = distill_loss("hidden_mse", "embedding", SimpleNamespace(hidden_states=moved),
                         SimpleNamespace(hidden_states=teacher), {"attention_mask": mask}, 1.0)
    assert again.item() == got.item()
    # and the same loss applies to a causal LM (attention mask, no labels needed)
    lm = distill_loss("hidden_mse", "causal_lm", SimpleNamespace(hidden_states=student),
                      SimpleNamespace(hidden_states=teacher), {"attention_mask": mask, "labels": mask}, 1.0)
    assert lm.item() == got.item()
