"""scripts/benchmarks/nn_margins.py: disagreements counted by the float model's top-1/top-2 margin."""

import torch
import torch.nn.functional as F


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_margin_report_counts_a_near_tie_swap(load_bench_script):
    with load_bench_script("nn_margins") as nn_margins:
        # Sentence 0's neighbours 1 and 2 are almost tied (cos 0.9950 vs 0.9949: margin 1e-4); sentence 3's
        # top-1 (4) leads its top-2 by far. The candidate swaps 0's tie and keeps 3's clear neighbour.
        a = [1.0, 0.0, 0.0, 0.0]
        reference = _unit([a, [0.995, (1 - 0.995 ** 2) ** 0.5, 0, 0], [0.9949, 0, (1 - 0.9949 ** 2) ** 0.5, 0],
                           [0, 0, 0, 1.0], [0, 0.3, 0, 0.95]])
        candidate = reference.clone()
        candidate[0] = _unit([[1.0, -0.01, 0.01, 0.0]])[0]  # now closer to 2 than to 1
        report = nn_margins.margin_report(reference, candidate)
        ref_nn = (reference @ reference.t()).fill_diagonal_(-2).argmax(-1)
        cand_nn = (candidate @ candidate.t()).fill_diagonal_(-2).argmax(-1)
        expected_wrong = int((ref_nn != cand_nn).sum())
        assert report["disagreements"] == expected_wrong >= 1
        assert int(ref_nn[0]) == 1 and int(cand_nn[0]) == 2  # the planted swap happened
        assert report["disagreements_margin_below_0.001"] == expected_wrong  # all on near-ties
        assert report["picked_float_second"] >= 1
        # qat.evaluation's float32 mean of 5 flags: within float32 rounding (6e-8 relative) of the count
        assert abs(report["nn_agreement"] - (1 - expected_wrong / 5)) < 1e-7
        # cosine is the mean of row-wise dot products (float64 reference: exact to rounding)
        assert abs(report["cosine"] - float((reference * candidate).sum(-1).mean())) < 1e-12
