"""Each component against an independent computation written here."""

import itertools
import math

import pytest
import torch
from helpers import rel_err, tiny_config

from dsv3ref import RopeScaling
from dsv3ref.mla import MLA
from dsv3ref.mlp import MLP
from dsv3ref.moe import MoE
from dsv3ref.norm import RMSNorm
from dsv3ref.rope import RotaryEmbedding, apply_rope, rope_inv_freq, softmax_scale, yarn_mscale
from dsv3ref.router import Router, select_experts


# ----------------------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_matches_float64_formula():
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(5, 7, 64) * 3
    x64, w64 = x.double(), norm.weight.double()
    expected = w64 * x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6)
    assert rel_err(norm(x), expected) < 1e-6  # float32 round-off


def test_rmsnorm_in_bf16_equals_hf_bit_for_bit():
    """In bf16 the statistics must be taken in float32 and the result rounded once, as DeepSeek's and
    HF's code do; HF's module on the same weights computes the same operations, so the outputs are
    equal bit for bit (statistics taken in bf16 differ in about a third of the elements)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    ours, theirs = RMSNorm(64, eps=1e-6).bfloat16(), DeepseekV3RMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(1 + 0.3 * torch.randn(64))
        theirs.weight.copy_(ours.weight)
    x = (torch.randn(8, 64) * torch.logspace(-2, 2, 8)[:, None]).bfloat16()
    assert torch.equal(ours(x), theirs(x))


def test_rmsnorm_places_eps_inside_the_root():
    """x with mean(x^2) close to eps = 1e-6, where eps inside sqrt() and outside give different values:
    float64 against the formula to 1e-14."""
    norm = RMSNorm(32, eps=1e-6).double()
    x = 1e-3 * torch.randn(4, 32, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    assert rel_err(norm(x), expected) < 1e-14
    assert rel_err(x / (torch.sqrt((x**2).mean(-1, keepdim=True)) + 1e-6), expected) > 1e-2  # the test can tell


def test_rmsnorm_in_float64_is_exact_to_float64_roundoff():
    norm = RMSNorm(32).double()
    x = torch.randn(4, 32, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    assert norm(x).dtype == torch.float64
    assert rel_err(norm(x), expected) < 1e-14


# -------------------------------------------------------------------------------------------- RoPE
def test_rope_is_complex_rotation_of_interleaved_pairs():
    """RoFormer: pair i of a vector at position m is multiplied by exp(j * m * theta_i)."""
    cfg = tiny_config(rope_scaling=None)
    rope = RotaryEmbedding(cfg)
    positions = torch.tensor([[0, 1, 5, 100]])
    x = torch.randn(1, 4, 3, cfg.qk_rope_head_dim, dtype=torch.float64)
    cos, sin = rope(positions, torch.float64)
    got = apply_rope(x, cos[:, :, None], sin[:, :, None])
    theta = 10000.0 ** (-torch.arange(0, cfg.qk_rope_head_dim, 2, dtype=torch.float64) / cfg.qk_rope_head_dim)
    z = torch.view_as_complex(x.reshape(1, 4, 3, -1, 2).contiguous())
    rot = torch.exp(1j * positions[..., None, None].double() * theta)
    expected = torch.view_as_real(z * rot).reshape(x.shape)
    assert rel_err(got, expected) < 1e-14


def test_rope_scores_depend_only_on_relative_position():
    cfg = tiny_config()
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(cfg.qk_rope_head_dim, dtype=torch.float64), torch.randn(cfg.qk_rope_head_dim,
                                                                                 dtype=torch.float64)

    def score(m, n):
        cq, sq = rope(torch.tensor([m]), torch.float64)
        ck, sk = rope(torch.tensor([n]), torch.float64)
        return (apply_rope(q, cq[0], sq[0]) * apply_rope(k, ck[0], sk[0])).sum()

    assert score(7, 3).item() == pytest.approx(score(54, 50).item(), rel=1e-12)


def test_yarn_frequencies_match_hf_and_the_ramp_limits():
    from types import SimpleNamespace

    from transformers.modeling_rope_utils import _compute_yarn_parameters

    cfg = tiny_config(qk_rope_head_dim=64, rope_theta=10000.0,
                      rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096,
                                               mscale=1.0, mscale_all_dim=1.0))
    ours = rope_inv_freq(cfg)
    params = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                  beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    hf_cfg = SimpleNamespace(rope_parameters=params, head_dim=64, hidden_size=0, num_attention_heads=1,
                             max_position_embeddings=163840, standardize_rope_params=lambda: None)
    hf_freq, hf_factor = _compute_yarn_parameters(hf_cfg)
    assert rel_err(ours, hf_freq) < 1e-6  # HF works in float32
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    # Pairs turning more than beta_fast=32 times over 4096 positions are kept; fewer than once: divided by 40.
    turns = 4096 * base / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any() and not (fast | slow).all()  # both ends and a ramp between them
    assert torch.allclose(ours[fast], base[fast], rtol=1e-14, atol=0)
    assert torch.allclose(ours[slow], base[slow] / 40, rtol=1e-14, atol=0)
    # HF's cos/sin amplitude ("attention factor") for mscale == mscale_all_dim, against dsv3ref's own
    cos, sin = RotaryEmbedding(cfg)(torch.arange(5)[None], torch.float64)
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, hf_factor**2), rtol=1e-6)


def test_yarn_softmax_scale_and_amplitude():
    cfg = tiny_config(rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=16,
                                               mscale=0.5, mscale_all_dim=1.0))
    m_all = 0.1 * math.log(40) + 1
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim**-0.5 * m_all**2, rel=1e-15)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(3)[None], torch.float64)
    amplitude = (0.05 * math.log(40) + 1) / m_all
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, amplitude**2), rtol=1e-14)
    assert yarn_mscale(1.0, 5.0) == 1.0


# ------------------------------------------------------------------------------------------ Router
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


# --------------------------------------------------------------------------------------------- MoE
def test_moe_loop_matches_dense_all_experts_computation():
    """Run every expert on every token and weigh by a dense (tokens, experts) gate matrix, in float64."""
    cfg = tiny_config(n_shared_experts=2)
    moe = MoE(cfg).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(3, 11, cfg.hidden_size, dtype=torch.float64)
    tokens = x.reshape(-1, cfg.hidden_size)
    weights, ids = moe.gate(tokens)
    gate = torch.zeros(tokens.shape[0], cfg.n_routed_experts, dtype=torch.float64)
    gate.scatter_(1, ids, weights)
    all_out = torch.stack([e(tokens) for e in moe.experts], dim=1)  # (n, experts, dim)
    expected = (gate[..., None] * all_out).sum(1) + moe.shared_experts(tokens)
    assert rel_err(moe(x).reshape(-1, cfg.hidden_size), expected) < 1e-13


def test_mlp_is_swiglu():
    mlp = MLP(8, 16).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    a = x @ mlp.gate_proj.weight.T
    expected = ((a / (1 + torch.exp(-a))) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    assert rel_err(mlp(x), expected) < 1e-14


# --------------------------------------------------------------------------------------------- MLA
@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_mla_matches_per_head_float64_reference(q_lora_rank):
    """Eqs. 1-11 one head at a time: build each head's key and value from the latent, attend causally."""
    cfg = tiny_config(q_lora_rank=q_lora_rank)
    attn = MLA(cfg).double()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    b, t = 2, 9
    x = torch.randn(b, t, cfg.hidden_size, dtype=torch.float64)
    pos = torch.arange(t).expand(b, t)
    cos, sin = RotaryEmbedding(cfg)(pos, torch.float64)
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)
    got = attn(x, cos, sin, mask)

    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if q_lora_rank is None:
        q_all = x @ attn.q_proj.weight.T
    else:
        cq = attn.q_a_layernorm(x @ attn.q_a_proj.weight.T)
        q_all = cq @ attn.q_b_proj.weight.T
    kv_a = x @ attn.kv_a_proj_with_mqa.weight.T
    c = attn.kv_a_layernorm(kv_a[..., :r])
    k_r = apply_rope(kv_a[..., r:], cos, sin)
    w_kv = attn.kv_b_proj.weight  # (h * (dn + dv), r)
    heads = []
    for h in range(cfg.num_attention_heads):
        q_h = q_all[..., h * (dn + dr):(h + 1) * (dn + dr)]
        q_h = torch.cat([q_h[..., :dn], apply_rope(q_h[..., dn:], cos, sin)], dim=-1)
        w_h = w_kv[h * (dn + dv):(h + 1) * (dn + dv)]
        k_h = torch.cat([c @ w_h[:dn].T, k_r], dim=-1)
        v_h = c @ w_h[dn:].T
        s = q_h @ k_h.transpose(1, 2) * softmax_scale(cfg)
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
        heads.append(s.softmax(-1) @ v_h)
    expected = torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    assert rel_err(got, expected) < 1e-13


def test_every_selected_expert_subset_is_reachable_only_within_topk_groups():
    """With topk_group groups kept, a token's experts never span more than topk_group groups."""
    scores = torch.rand(500, 16, dtype=torch.float64)
    ids = select_experts(scores, None, top_k=4, n_group=8, topk_group=3, topk_method="noaux_tc")
    for row in ids.tolist():
        assert len({e // 2 for e in row}) <= 3
    assert set(itertools.chain.from_iterable(ids.tolist())) == set(range(16))
