"""The router against a brute-force enumeration, routing capture, and the balancing rules (bias
update, sequence-wise balance loss) against hand computations."""

import itertools
from collections import Counter

import pytest
import torch
from helpers import random_dsv3ref, rel_err, tiny_config

import dsv3ref
from dsv3ref import routing
from dsv3ref.router import Router, select_experts


def brute_force_route(scores, bias, top_k, n_group, topk_group, method):
    """Enumerate groups, then experts, in plain Python; ties go to the lower index."""
    n_experts = len(scores)
    per = n_experts // n_group
    choice = [s + (b if bias is not None else 0.0) for s, b in zip(scores, bias or [0.0] * n_experts, strict=True)]
    groups = [list(range(g * per, (g + 1) * per)) for g in range(n_group)]
    if method == "greedy" or n_group == 1:
        eligible = list(range(n_experts))
    else:
        if method == "noaux_tc":
            gscore = [sum(sorted((choice[e] for e in grp), reverse=True)[:2]) for grp in groups]
        else:
            gscore = [max(choice[e] for e in grp) for grp in groups]
        best_groups = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
        eligible = [e for g in sorted(best_groups) for e in groups[g]]
    return sorted(eligible, key=lambda e: (-choice[e], e))[:top_k]


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy", "greedy"])
@pytest.mark.parametrize("n_group,topk_group,top_k", [(4, 2, 3), (1, 1, 2), (8, 3, 5), (2, 1, 1)])
def test_router_choice_matches_brute_force(method, n_group, topk_group, top_k):
    g = torch.Generator().manual_seed(n_group * 10 + top_k)
    scores = torch.rand(50, 16, generator=g, dtype=torch.float64)
    bias = (torch.rand(16, generator=g, dtype=torch.float64) - 0.5) * 0.4 if method == "noaux_tc" else None
    got = select_experts(scores, bias, top_k=top_k, n_group=n_group, topk_group=topk_group, topk_method=method)
    for t in range(scores.shape[0]):
        expected = brute_force_route(scores[t].tolist(), None if bias is None else bias.tolist(),
                                     top_k, n_group, topk_group, method)
        assert got[t].tolist() == expected


def test_router_ties_resolve_to_lower_index():
    scores = torch.tensor([[0.5] * 8, [0.2, 0.9, 0.9, 0.2, 0.9, 0.9, 0.1, 0.1]], dtype=torch.float64)
    got = select_experts(scores, torch.zeros(8, dtype=torch.float64), top_k=3, n_group=4, topk_group=2,
                         topk_method="noaux_tc")
    for t in range(2):
        assert got[t].tolist() == brute_force_route(scores[t].tolist(), [0.0] * 8, 3, 4, 2, "noaux_tc")
    assert got[0].tolist() == [0, 1, 2]
    # groups score 1.1, 1.1, 1.8, 0.2: group 2 and, of the tied groups 0 and 1, group 0 stay eligible
    assert got[1].tolist() == [1, 4, 5]


@pytest.mark.parametrize("norm", [True, False])
def test_router_weights_use_unbiased_scores(norm):
    cfg = tiny_config(norm_topk_prob=norm, routed_scaling_factor=2.5)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.copy_(torch.linspace(-1, 1, cfg.n_routed_experts))
    x = torch.randn(20, cfg.hidden_size, dtype=torch.float64)
    weights, ids = router(x)
    s = torch.sigmoid(x @ router.weight.double().T)
    chosen = torch.stack([s[t, ids[t]] for t in range(20)])
    expected = chosen / chosen.sum(-1, keepdim=True) if norm else chosen
    assert rel_err(weights, 2.5 * expected) < 1e-14
    # the bias decides the choice: without it some tokens choose differently
    plain = select_experts(s, None, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
                           topk_group=cfg.topk_group)
    assert not torch.equal(plain.sort(-1).values, ids.sort(-1).values)


def test_every_selected_expert_subset_is_reachable_only_within_topk_groups():
    """With topk_group groups kept, a token's experts never span more than topk_group groups."""
    scores = torch.rand(500, 16, dtype=torch.float64)
    ids = select_experts(scores, None, top_k=4, n_group=8, topk_group=3, topk_method="noaux_tc")
    for row in ids.tolist():
        assert len({e // 2 for e in row}) <= 3
    assert set(itertools.chain.from_iterable(ids.tolist())) == set(range(16))


def test_capture_records_every_router_decision_and_is_off_by_default():
    cfg = tiny_config(num_hidden_layers=3, first_k_dense_replace=1)
    model = random_dsv3ref(cfg, seed=13, moe_impl="grouped")
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad(), routing.capture(model) as records:
        model(ids)
        model(ids[:, :4])
    assert sorted(records) == [1, 2] and all(len(r) == 2 for r in records.values())
    first = records[1][0]
    assert first.ids.shape == (22, cfg.num_experts_per_tok) and first.groups.shape == (22, cfg.topk_group)
    assert first.counts.sum() == 22 * cfg.num_experts_per_tok
    per_group = cfg.n_routed_experts // cfg.n_group
    assert all(set((row // per_group).tolist()) <= set(g.tolist()) for row, g in zip(first.ids, first.groups,
                                                                                      strict=True))
    # the recorded decision is what the router computes on that layer's input (taken from a trace)
    layer = model.model.layers[1]
    residual = dsv3ref.trace(model, ids)["model.layers.1.post_attention_layernorm:input"]
    with torch.no_grad():
        weights, chosen = layer.mlp.gate(layer.post_attention_layernorm(residual).reshape(22, -1))
    assert torch.equal(first.ids, chosen) and torch.equal(first.weights, weights)
    tally = Counter(chosen.flatten().tolist())  # tokens per expert, counted from the router's choice
    assert first.counts.tolist() == [tally[e] for e in range(cfg.n_routed_experts)]
    # and capturing is off again afterwards
    assert all(r.records is None for r in routing.routers(model).values())


def test_update_bias_hand_computed():
    bias = torch.tensor([0.5, -0.25, 0.0, 0.125])
    load = torch.tensor([3, 1, 2, 2])  # mean 2: expert 0 is hot, expert 1 is cold
    routing.update_bias(bias, load, gamma=0.125)
    assert bias.tolist() == [0.375, -0.125, 0.0, 0.125]


def test_bias_updates_even_out_the_load():
    cfg = tiny_config(first_k_dense_replace=0, num_hidden_layers=1, n_routed_experts=16, n_group=4, topk_group=2,
                      num_experts_per_tok=2)
    model = random_dsv3ref(cfg, seed=14, moe_impl="grouped")
    router = model.model.layers[0].mlp.gate
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.weight[:4] += 0.5 * router.weight[:4].sign()  # experts 0-3 attract far more tokens
    ids = torch.randint(0, cfg.vocab_size, (4, 64))

    def load():
        with torch.no_grad(), routing.capture(model) as records:
            model(ids)
        return records[0][0].counts.float()

    before = load()
    for _ in range(200):
        routing.update_bias(router.e_score_correction_bias, load(), gamma=0.01)
    after = load()
    imbalance = lambda c: (c.max() / c.mean()).item()  # noqa: E731
    assert imbalance(after) < 0.6 * imbalance(before)


def test_sequence_balance_loss_hand_computed():
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 0.0, 0.0]]], requires_grad=True)
    ids = torch.tensor([[[2], [0]]])
    # s' = [.25 .25 .25 .25], [.75 .25 0 0]; P = [.5 .25 .125 .125]; f = 4/(1*2) * [1 0 1 0] = [2 0 2 0]
    loss = routing.sequence_balance_loss(scores, ids, alpha=0.1)
    assert loss.item() == pytest.approx(0.1 * (2 * 0.5 + 2 * 0.125), rel=1e-6)
    loss.backward()
    # d/ds of alpha * sum_i f_i * mean_t s_it / sum_j s_jt, for token 0 (sum 4): alpha/2 * (f_i - sum_j f_j s'_j) / 4
    expected = 0.1 / 2 * (torch.tensor([2.0, 0, 2, 0]) - 1.0) / 4
    assert torch.allclose(scores.grad[0, 0], expected, atol=1e-7)


def test_sequence_balance_loss_with_two_experts_per_token_hand_computed():
    """Eq. 18 with K_r = 2: f_i = N_r / (K_r T) * (tokens choosing i). Without the K_r the loss doubles."""
    scores = torch.tensor([[[2.0, 1.0, 1.0, 0.0],
                            [1.0, 1.0, 1.0, 1.0],
                            [0.0, 0.0, 1.0, 3.0]]])  # (1 sequence, T = 3 tokens, N_r = 4)
    ids = torch.tensor([[[0, 1], [1, 2], [2, 3]]])  # K_r = 2
    # s' rows: [.5 .25 .25 0], [.25 .25 .25 .25], [0 0 .25 .75]; P = mean = [.25 .1667 .25 .3333]
    # counts [1 2 2 1]; f = 4 / (2 * 3) * counts = [2/3 4/3 4/3 2/3]
    # sum f_i P_i = (2/3)(1/4) + (4/3)(1/6) + (4/3)(1/4) + (2/3)(1/3) = 1/6 + 2/9 + 1/3 + 2/9 = 17/18
    loss = routing.sequence_balance_loss(scores, ids, alpha=0.1)
    assert loss.item() == pytest.approx(0.1 * 17 / 18, rel=1e-6)


def test_sequence_balance_loss_averages_sequences():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 10, 8, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(30)]).reshape(3, 10, 2)
    whole = routing.sequence_balance_loss(scores, ids)
    each = [routing.sequence_balance_loss(scores[i:i + 1], ids[i:i + 1]) for i in range(3)]
    assert whole.item() == pytest.approx(sum(e.item() for e in each) / 3, rel=1e-6)
    # perfectly balanced routing with uniform scores gives alpha * 1
    uniform = torch.ones(1, 8, 8)
    balanced = torch.arange(8).reshape(1, 8, 1)
    assert routing.sequence_balance_loss(uniform, balanced, alpha=1.0).item() == pytest.approx(1.0)


def test_a_bf16_model_keeps_the_bias_in_float32_and_routes_as_float32_says():
    """Cast to bf16, the bias stays float32 (DeepSeek's Gate keeps it so): with equal scores the choice
    rests on bias differences of 1e-4, below bf16's resolution near 0.3 (2^-9), so a bias rounded to
    bf16 would tie and choose by index; the choice must be the brute-force one on the float32 bias."""
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    model = dsv3ref.DeepseekV3(cfg)
    router = next(m for m in model.modules() if isinstance(m, Router))
    bias = torch.tensor([0.3, 0.3004, 0.3001, 0.3005, 0.3003, 0.3006, 0.3002, 0.3007])
    with torch.no_grad():
        router.weight.zero_()  # every score sigmoid(0) = 0.5: only the bias tells experts apart
        router.e_score_correction_bias.copy_(bias)
    model.to(torch.bfloat16)
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, bias)
    _, ids = router(torch.randn(4, cfg.hidden_size).to(torch.bfloat16))
    expected = brute_force_route([0.5] * 8, bias.double().tolist(), 2, 4, 2, "noaux_tc")
    assert all(sorted(row) == sorted(expected) for row in ids.tolist()), (ids.tolist(), expected)
    assert bias.to(torch.bfloat16).unique().numel() < 8  # bf16 would indeed merge some of them
