"""disable_dropout (on by default): the student trains without dropout noise against its float teacher."""

import copy

import pytest
import torch
import transformers

from qat.trainers import QATArguments, QATTrainer
from qat.trainers.run import prepare_model


def _bert_with_dropout():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64,
                                  hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    return transformers.BertModel(cfg)


@pytest.mark.parametrize("disable", [True, False])
def test_training_forward_is_deterministic_only_without_dropout(tmp_path, disable):
    args = QATArguments(output_dir=str(tmp_path), task="embedding", distill="cosine", adapter="lora", adapter_rank=4,
                        bits=4, group_size=32, max_steps=1, report_to="none", disable_dropout=disable)
    model = _bert_with_dropout()
    teacher = copy.deepcopy(model).eval()
    prepare_model(args, model, None)
    QATTrainer(model=model, args=args, teacher=teacher)
    model.train()  # what Trainer.training_step does
    ids = torch.randint(5, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    first, second = (model(input_ids=ids).last_hidden_state for _ in range(2))
    if disable:
        assert torch.equal(first, second)  # no random masks: the same forward, bit for bit
        # and what trains is the eval-mode model (the one exported and scored)
        assert torch.equal(first, model.eval()(input_ids=ids).last_hidden_state)
        assert model.config.hidden_dropout_prob == 0.3  # the saved config keeps the user's value
    else:
        assert (first - second).abs().max() > 1e-3  # p = 0.3 dropout really is on: the test can fail
