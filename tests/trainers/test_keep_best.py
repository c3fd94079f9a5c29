"""keep_best: the job never ends worse on dev than it started (tiny BERT, the default recipe's shape:
embedding task, inside LoRA, cosine distillation), with a planted harmful learning rate."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset

from qat.trainers import QATArguments, QATTrainer
from qat.trainers.run import prepare_model


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (n, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 8:] = 0  # some padded rows: pooling must respect the mask
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})


def _collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


@torch.no_grad()
def dev_distance(model, teacher, dev) -> float:
    """Mean 1 - cos(mean-pooled student, mean-pooled teacher) over the dev rows, in float64."""
    batch = _collate([dev[i] for i in range(len(dev))])
    m = batch["attention_mask"].unsqueeze(-1).double()
    pool = lambda net: (net(**batch).last_hidden_state.double() * m).sum(1) / m.sum(1)  # noqa: E731
    model.eval()
    return float((1 - F.cosine_similarity(pool(model), pool(teacher), dim=-1)).mean())


def _train(tmp_path, keep_best, lr, steps=12, bits=2, **extra):
    args = QATArguments(**extra, output_dir=str(tmp_path), task="embedding", distill="cosine", adapter="lora", adapter_rank=4,
                        bits=bits, group_size=32, learning_rate=lr, step_learning_rate=lr, lr_scheduler_type="constant",
                        max_steps=steps, per_device_train_batch_size=8, keep_best=keep_best, keep_best_steps=4,
                        save_steps=1000, logging_steps=4, report_to="none", seed=0, disable_tqdm=True,
                        dataloader_pin_memory=False)
    model = tiny_bert()
    teacher = copy.deepcopy(model)
    prepare_model(args, model, _data(64, seed=0) if args.quant_init == "gptq" else None)
    dev = _data(24, seed=1)
    start = dev_distance(model, teacher, dev)
    trainer = QATTrainer(model=model, args=args, teacher=teacher, train_dataset=_data(64, seed=0), dev_dataset=dev,
                         data_collator=_collate)
    trainer.train()
    return start, dev_distance(model, teacher, dev), trainer


def test_harmful_learning_rate_ends_no_worse_than_the_start(tmp_path):
    # W2 (a start far enough from float for training to matter); lr 0.3 on LoRA and steps wrecks the quantized model (checked below with keep_best off)
    start, end, trainer = _train(tmp_path / "keep", keep_best=True, lr=0.3)
    assert trainer.keep_best.best_step == 0
    # restored bit for bit: the same score as at the start (same weights, same deterministic ops)
    assert end == pytest.approx(start, rel=1e-9, abs=0)
    start_off, end_off, _ = _train(tmp_path / "off", keep_best=False, lr=0.3)
    assert start_off == pytest.approx(start, rel=1e-9, abs=0)
    assert end_off > 1.5 * start  # the planted harm is real: without keep_best the job ends worse


def test_a_good_learning_rate_keeps_a_later_better_state(tmp_path):
    start, end, trainer = _train(tmp_path, keep_best=True, lr=3e-3)
    kb = trainer.keep_best.summary()
    steps = [h["step"] for h in kb["history"]]
    assert steps == [0, 4, 8, 12]
    assert kb["best_step"] > 0 and end < start
    # the callback's own score (fp32 cosines, each 1 - cos good to ~1e-7 near 1) agrees with this
    # float64 recomputation of the kept state
    assert kb["best_dev_score"] == pytest.approx(end, abs=1e-6)


def test_default_recipe_from_a_gptq_init_ends_no_worse_than_the_init(tmp_path):
    # Issue 14: inside LoRA under fake_quant re-rounds the GPTQ codes every step, which used to
    # undo the error compensation; keep_best must hand back a dev score at least as good as step 0.
    kw = dict(quant_init="gptq", gptq_act_order=True, calibration_samples=32)
    start, end, trainer = _train(tmp_path, keep_best=True, lr=0.3, **kw)
    assert end <= start + 1e-9  # the same weights or better: float64 recomputation, no tolerance needed
    _, end_off, _ = _train(tmp_path / "off", keep_best=False, lr=0.3, **kw)
    assert end_off > start  # the planted harm (lr 0.3) is real from a GPTQ start too


def test_matryoshka_runs_score_the_weighted_widths(tmp_path):
    """A Matryoshka run trains sum_r w_r loss_r: keep_best scores the same sum over the widths, not the
    int8 model alone (near-lossless, so any training looks worse there and step 0 would always win)."""
    from qat.matryoshka import use_width

    widths, weights = [8, 4, 2], [1.0, 0.5, 2.0]
    _, _, trainer = _train(tmp_path, keep_best=True, lr=3e-3, steps=4, bits=8, storage_bits=8,
                           matryoshka_widths=widths, matryoshka_weights=weights)
    model, dev = trainer.model, _data(24, seed=1)
    teacher = trainer.teacher
    per_width = []
    for bits in widths:
        with use_width(model, bits):
            per_width.append(dev_distance(model, teacher, dev))
    assert per_width[2] > per_width[1] > per_width[0]  # the slices differ: the sum is not the int8 score alone
    want = sum(w * d for w, d in zip(weights, per_width))
    # fp32 cosines per example (each 1 - cos good to ~1e-7), weighted by <= 2 over 3 widths
    assert trainer.keep_best.score(model) == pytest.approx(want, abs=1e-5)
