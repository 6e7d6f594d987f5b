"""Swin-MoE routing (models/moe.py) on hand-made gate scores: top-k, capacity, drops, batch-prioritised order,
normalised gates, and the two auxiliary losses, against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from models.moe import ExpertParallel, MoELayer, gshard_loss, load_importance_loss, route

# 6 tokens, 2 experts: tokens 0, 1, 3, 5 prefer expert 0 (with probabilities 0.6, 0.9, 0.7, 0.8)
SCORES = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3], [0.2, 0.8], [0.8, 0.2]])


def test_capacity_is_k_times_the_truncated_factor_times_tokens_per_expert():
    # ceil(6 / 2) = 3 tokens per expert; int(1.0 * 3) = 3; int(1.25 * 3) = 3; int(1.5 * 3) = 4
    assert route(SCORES, 1, 1.0, False, False).capacity == 3
    assert route(SCORES, 1, 1.25, False, False).capacity == 3
    assert route(SCORES, 1, 1.5, False, False).capacity == 4
    assert route(SCORES, 2, 1.0, False, False).capacity == 6


def test_without_priority_the_token_past_capacity_in_token_order_is_dropped():
    r = route(SCORES, 1, 1.0, batch_prioritized=False, normalize_gate=False)
    assert r.experts[:, 0].tolist() == [0, 0, 1, 0, 1, 0]
    assert r.locations[:, 0].tolist() == [0, 1, 0, 2, 1, 3]
    assert r.kept[:, 0].tolist() == [True, True, True, True, True, False]  # token 5: 4th for expert 0
    assert torch.equal(r.gates[:, 0], SCORES.max(dim=1).values)  # k = 1: the softmax probability itself


def test_batch_prioritised_routing_gives_the_slots_by_best_score_and_drops_the_least_sure():
    r = route(SCORES, 1, 1.0, batch_prioritized=True, normalize_gate=False)
    # expert 0 in order of score: token 1 (0.9), 5 (0.8), 3 (0.7), 0 (0.6): token 0 is dropped
    assert r.locations[:, 0].tolist() == [3, 0, 1, 2, 0, 1]
    assert r.kept[:, 0].tolist() == [False, True, True, True, True, True]


def test_second_choices_queue_behind_every_first_choice_and_normalised_gates_sum_to_one():
    r = route(SCORES, 2, 0.5, batch_prioritized=False, normalize_gate=True)
    assert r.capacity == 2 * int(0.5 * 3) == 2
    # expert 1's first choices: tokens 2, 4 (slots 0, 1); its second choices: tokens 0, 1, 3, 5 (slots 2..5)
    assert r.experts[:, 1].tolist() == [1, 1, 0, 1, 0, 1]
    assert r.locations[:, 1].tolist() == [2, 3, 4, 4, 5, 5]
    assert torch.allclose(r.gates.sum(dim=1), torch.ones(6))
    assert not r.kept[:, 1].any() and r.kept[:, 0].tolist() == [True, True, True, False, True, False]


def test_a_zero_capacity_factor_takes_what_is_needed_and_a_negative_one_caps_it():
    assert route(SCORES, 1, 0.0, False, False).capacity == 4  # expert 0 needs 4 slots
    assert route(SCORES, 1, -1.0, False, False).capacity == 3  # min(4, int(1.0 * 3))
    assert route(SCORES, 1, 1.0, False, False, alignment=2).capacity == 4  # rounded up to the shard count


def test_the_capacity_follows_the_largest_token_count_and_need_agreed_over_the_ranks():
    # another rank holds 12 tokens and needs 5 slots: ceil(12 / 2) = 6, int(1.0 * 6) = 6; factor 0: 5
    agree = lambda tokens, needed: (max(tokens, 12), max(int(needed), 5))  # noqa: E731
    assert route(SCORES, 1, 1.0, False, False, agree=agree).capacity == 6
    assert route(SCORES, 1, 0.0, False, False, agree=agree).capacity == 5


def test_gshard_loss_by_hand():
    # E * sum_e mean(scores[:, e]) * share of first choices: means (3.5/6, 2.5/6), shares (4/6, 2/6)
    first = SCORES.argmax(dim=1, keepdim=True)
    expected = 2 * (3.5 / 6 * 4 / 6 + 2.5 / 6 * 2 / 6)
    assert gshard_loss(SCORES, first).item() == pytest.approx(expected)


def test_load_importance_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    probs = logits.softmax(dim=1)
    experts = logits.argmax(dim=1, keepdim=True)
    sigma = 1.0 / 2

    def cv2(x):  # unbiased variance over the mean squared
        return x.var() / x.mean() ** 2

    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    threshold = [2.0, 1.0]  # the noisy (here: noise-free) logit of each token's choice
    load = torch.tensor([sum(phi((probs[t, e].item() - threshold[t]) / sigma) for t in range(2)) for e in range(2)])
    expected = (cv2(probs.sum(dim=0)) + cv2(load)) / 2
    assert load_importance_loss(probs, logits, experts, gate_noise=1.0).item() == pytest.approx(expected.item())


def test_a_token_dropped_by_every_expert_gets_zero_so_the_block_passes_its_residual():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, ExpertParallel(2), capacity_factor=0.25, gate_noise=1.0).eval()  # eval: no noise  # capacity 1 per expert
    x = torch.randn(1, 8, 8)
    y, _ = layer(x)
    routing, _ = layer.route(x.reshape(-1, 8))
    dropped = ~routing.kept[:, 0]
    assert dropped.sum() == 6
    assert torch.equal(y[0][dropped], torch.zeros(6, 8)) and (y[0][~dropped].abs().sum(dim=1) > 0).all()


def test_the_load_loss_without_gate_noise_is_refused():
    with pytest.raises(ValueError, match='GATE_NOISE'):
        MoELayer(8, 16, ExpertParallel(2), gate_noise=0.0)


def test_the_layer_routes_hand_made_gate_logits_through_softmax_then_top_k():
    layer = MoELayer(2, 4, ExpertParallel(2), capacity_factor=1.0, batch_prioritized_routing=True).eval()
    with torch.no_grad():
        layer.gates[0].wg.weight.copy_(torch.eye(2))  # the tokens are their own gate logits
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    routing, _ = layer.route(logits)
    probs = logits.softmax(dim=1)
    assert routing.capacity == 2 and routing.experts[:, 0].tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(routing.gates[:, 0], probs.max(dim=1).values)
    # expert 0 is asked by tokens 1 (p=0.95), 3 (0.88), 0 (0.73): the least sure, token 0, is dropped
    assert routing.kept[:, 0].tolist() == [False, True, True, True]
