"""dsv3ref.kernels: the reference ops with FlashMLA's, DeepGEMM's and DeepEP's interfaces, the paged
latent cache, the model run through a user's kernel, and the check CLI.

Oracles: each op's formula written out here independently (per row, per expert, per token, in
float64), and the model's own computation (the static cache; FP8Linear's emulated GEMM).
Tolerances: 1e-10 where both sides compute in float64; float32 ones stated where they are used.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import mtp_config, random_dsv3ref, rel_err, tiny_config

import dsv3ref
import dsv3ref.kernels as K
from dsv3ref import compare, trace
from dsv3ref.fp8 import dequantize_weight, mn_major_tma_aligned, quantize_activation, quantize_weight
from dsv3ref.kernels import ep, planted
from dsv3ref.kernels.check import run_check
from dsv3ref.kernels.gemm import contiguous_layout, pack_ue8m0, unpack_ue8m0

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ MLA decoding
def attention_by_rows(q, k_cache, block_table, seqlens, dv, scale, causal):
    """FlashMLA's definition, one row and one query at a time, in float64."""
    b, s_q, h, _ = q.shape
    page = k_cache.shape[1]
    out = torch.zeros(b, s_q, h, dv, dtype=torch.float64)
    lse = torch.full((b, h, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(seqlens[i])
        keys = torch.stack([k_cache[int(block_table[i, p // page]), p % page, 0] for p in range(n)]).double() if n \
            else torch.zeros(0, q.shape[-1], dtype=torch.float64)
        for t in range(s_q):
            last = n - s_q + t if causal and s_q > 1 else n - 1
            if last < 0:
                continue
            scores = q[i, t].double() @ keys[: last + 1].T * scale  # (h, s)
            lse[i, :, t] = torch.logsumexp(scores, -1)
            out[i, t] = torch.softmax(scores, -1) @ keys[: last + 1, :dv]
    return out, lse


@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True), (3, True), (2, False)])
def test_paged_mla_decoding_equals_its_formula_row_by_row(s_q, causal):
    g = torch.Generator().manual_seed(s_q)
    lens = [0, 1, 63, 64, 65, 130]
    table = torch.randperm(20, generator=g)[:18].reshape(6, 3).int()
    q = torch.randn(6, s_q, 4, 40, generator=g, dtype=torch.float64)
    k_cache = torch.randn(20, 64, 1, 40, generator=g, dtype=torch.float64)
    out, lse = K.flash_mla_with_kvcache(q, k_cache, table, torch.tensor(lens, dtype=torch.int32), 32,
                                        softmax_scale=0.3, causal=causal)
    ref_out, ref_lse = attention_by_rows(q, k_cache, table, lens, 32, 0.3, causal)
    assert (out - ref_out).abs().max() < 1e-10
    assert torch.equal(lse == math.inf, ref_lse == math.inf)  # rows with nothing to attend: +inf
    finite = ref_lse != math.inf
    assert (lse[finite] - ref_lse[finite]).abs().max() < 1e-10
    assert out[0].abs().max() == 0  # the empty row


def test_paged_mla_default_scale_and_key_heads_follow_flashmla():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 4, 16, generator=g, dtype=torch.float64)
    k_cache = torch.randn(2, 64, 2, 16, generator=g, dtype=torch.float64)  # two key heads, two query heads each
    out, _ = K.flash_mla_with_kvcache(q, k_cache, torch.tensor([[1]], dtype=torch.int32),
                                      torch.tensor([10], dtype=torch.int32), 8)
    keys = k_cache[1, :10]  # (s, h_k, d)
    for h in range(4):
        p = torch.softmax(q[0, 0, h] @ keys[:, h // 2].T / 4.0, -1)  # 1 / sqrt(16)
        assert (out[0, 0, h] - p @ keys[:, h // 2, :8]).abs().max() < 1e-12


@pytest.mark.parametrize("bad,message", [
    (dict(block_table=torch.tensor([[0, 9]], dtype=torch.int32)), r"block_table\[0, 1\] = 9 is outside the pool of 4"),
    (dict(cache_seqlens=torch.tensor([200], dtype=torch.int32)), "row 0 holds 200 positions, but block_table has "
                                                                  "room for 2 blocks of 64 = 128"),
    (dict(q=torch.zeros(1, 1, 4, 30)), "k_cache: head_dim 40 does not match q's 30"),
    (dict(head_dim_v=50), "head_dim_v: found 50, expected 1..40"),
    (dict(cache_seqlens=torch.tensor([3.0])), "cache_seqlens: expected an integer tensor of shape"),
])
def test_paged_mla_errors_name_the_argument_and_the_layout(bad, message):
    args = dict(q=torch.zeros(1, 1, 4, 40), k_cache=torch.zeros(4, 64, 1, 40),
                block_table=torch.tensor([[0, 1]], dtype=torch.int32),
                cache_seqlens=torch.tensor([100], dtype=torch.int32), head_dim_v=32) | bad
    with pytest.raises(ValueError, match=message):
        K.flash_mla_with_kvcache(**args)


# ----------------------------------------------------------------------------------------- paged cache
def chunks(model, ids, cache, cuts):
    edges = [0, *cuts, ids.shape[1]]
    return torch.cat([model(ids[:, a:b], cache, a) for a, b in zip(edges[:-1], edges[1:], strict=True)], dim=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_paged_cache_gives_the_static_cache_logits(dtype, tol):
    """Shuffled pages, a prefill crossing page boundaries, then decode steps; float32: the two compute
    the same absorbed attention, in another order of additions (measured ~1e-6)."""
    cfg = tiny_config(max_position_embeddings=256)
    model = random_dsv3ref(cfg, attn_impl="absorb", attn_order="absorbed").to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (3, 140), generator=torch.Generator().manual_seed(1))
    paged = model.new_cache(3, 160, kind="paged")
    paged.free_blocks = torch.randperm(paged.num_blocks, generator=torch.Generator().manual_seed(2)).tolist()
    static = model.new_cache(3, 160)
    cuts = [70, 71, 72, 129]
    got, want = chunks(model, ids, paged, cuts), chunks(model, ids, static, cuts)
    assert rel_err(got, want) < tol
    assert rel_err(got, model(ids)) < tol * 10
    assert (paged.block_table >= 0).sum() == 3 * 3  # 140 positions: three pages a row


def test_paged_cache_in_bfloat16_is_as_close_to_float64_as_the_static_cache():
    cfg = tiny_config(max_position_embeddings=256)
    model = random_dsv3ref(cfg, attn_impl="absorb", attn_order="absorbed")
    ids = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(3))
    exact = model.double()(ids)
    model = model.bfloat16()
    paged = chunks(model, ids, model.new_cache(2, 100, kind="paged"), [80])
    static = chunks(model, ids, model.new_cache(2, 100), [80])
    # The paged op computes attention in float32 from bf16 pages, the static path in bf16 with a float32
    # softmax; the whole bf16 model is ~6% off float64 on average (this random model: bf16 rounds every
    # layer, and routing flips). The paged cache must not add to that (measured over 3 seeds: 0.98-1.09x).
    def mean_err(a, b):
        return ((a.double() - b.double()).abs().mean() / b.double().abs().mean()).item()
    assert mean_err(paged, exact) <= 1.25 * mean_err(static, exact) + 0.01


def test_paged_rows_of_different_lengths_share_one_pool_and_free_their_pages():
    cfg = tiny_config(max_position_embeddings=256)
    model = random_dsv3ref(cfg, attn_impl="absorb", attn_order="absorbed").double()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (2, 200), generator=g)
    cache = model.new_cache(2, 200, kind="paged", num_blocks=5)  # not enough for two rows of 200
    model(ids[:, :10], cache, 0)
    start = torch.tensor([10, 10])
    for step in range(60):  # row 0 decodes, row 1 too; both stay within 5 pages
        model(ids[:, 10 + step:11 + step], cache, start + step)
    assert cache.blocks_held(0) == 2 and cache.blocks_held(1) == 2 and len(cache.free_blocks) == 1
    with pytest.raises(ValueError, match="the pool of 5 blocks of 64 positions is used up"):
        model(ids[:, 70:200], cache, torch.tensor([70, 70]))
    cache.free(1)  # row 1's sequence ended
    assert cache.blocks_held(1) == 0 and len(cache.free_blocks) == 3
    # row 0 continues to 131 positions while row 1 starts a new sequence in the freed pages
    both = model(torch.stack([ids[0, 70:131], ids[1, :61]]), cache, torch.tensor([70, 0]))
    alone = model(torch.stack([ids[0, :131], ids[1, :131]]))
    assert rel_err(both[0, -1], alone[0, 130]) < 1e-10 and rel_err(both[1], alone[1, :61]) < 1e-10
    with pytest.raises(ValueError, match="kind='paged' pages the latent cache of attn_impl='absorb'"):
        random_dsv3ref(cfg).new_cache(1, 10, kind="paged")


# ---------------------------------------------------------------------------------------------- GEMMs
def fp8_pair(m, n, k, seed, scale_fmt=None):
    g = torch.Generator().manual_seed(seed)
    a_q, sfa = quantize_activation(torch.randn(m, k, generator=g), scale_fmt=scale_fmt)
    b_q, sfb = quantize_weight(torch.randn(n, k, generator=g) * 0.1, scale_fmt=scale_fmt)
    return a_q, sfa, b_q, sfb


def dequantized_product(a_q, sfa, b_q, sfb):
    """The formula: both operands dequantized in float64 (per 1x128 tile and per 128x128 block), multiplied."""
    a = (a_q.double().unflatten(-1, (-1, 128)) * sfa.double()[..., None]).flatten(-2)
    return a @ dequantize_weight(b_q, sfb, dtype=torch.float64).T


@pytest.mark.parametrize("m,n,k", [(1, 320, 384), (130, 256, 128), (7, 576, 512)])
def test_fp8_gemm_nt_equals_the_dequantized_product(m, n, k):
    a_q, sfa, b_q, sfb = fp8_pair(m, n, k, seed=m)
    exact = dequantized_product(a_q, sfa, b_q, sfb)
    d64 = K.fp8_gemm_nt((a_q, sfa), (b_q, sfb), torch.empty(m, n, dtype=torch.float64), accumulate=torch.float64)
    assert rel_err(d64, exact) < 1e-12
    d32 = K.fp8_gemm_nt((a_q, mn_major_tma_aligned(sfa)), (b_q, sfb), torch.empty(m, n))  # DeepGEMM's layout
    assert rel_err(d32, exact) < 1e-6  # float32 accumulation of K/128 exact block sums
    c = torch.randn(m, n, dtype=torch.float64)
    with_c = K.fp8_gemm_nt((a_q, sfa), (b_q, sfb), torch.empty(m, n, dtype=torch.float64), c=c,
                           accumulate=torch.float64)
    assert rel_err(with_c, exact + c) < 1e-12


def test_fp8_gemm_reads_ue8m0_scales_packed_four_to_an_int32_and_per_row_weight_scales():
    a_q, sfa, b_q, sfb = fp8_pair(5, 256, 640, seed=1, scale_fmt="ue8m0")  # 5 K blocks: two int32 words
    packed = pack_ue8m0(sfa)
    assert packed.dtype == torch.int32 and packed.shape == (5, 2) and torch.equal(unpack_ue8m0(packed, 5), sfa)
    exact = dequantized_product(a_q, sfa, b_q, sfb)
    per_row = sfb.repeat_interleave(128, dim=0)  # SM100's 1x128 weight scales
    d = K.fp8_gemm_nt((a_q, packed), (b_q, pack_ue8m0(per_row)), torch.empty(5, 256, dtype=torch.float64),
                      accumulate=torch.float64)
    assert rel_err(d, exact) < 1e-12


@pytest.mark.parametrize("call,message", [
    (lambda a, s, b, t: K.fp8_gemm_nt((a[:, :100], s), (b[:, :100], t), torch.empty(4, 256)),
     "a: K = 100 is not a multiple of 128"),
    (lambda a, s, b, t: K.fp8_gemm_nt((a, s[:, :1]), (b, t), torch.empty(4, 256)),
     r"sfa: expected \(4, 2\) float32 \(1x128\).*found \(4, 1\)"),
    (lambda a, s, b, t: K.fp8_gemm_nt((a, s), (b, t.T), torch.empty(4, 256)),
     r"sfb: expected \(2, 2\) float32 \(128x128 blocks\).*found \(2, 2\)|sfb: expected"),
    (lambda a, s, b, t: K.fp8_gemm_nt((a, s), (b, t), torch.empty(4, 256), tma_layout=True),
     r"sfa: strides \(2, 1\) found; DeepGEMM reads these scales MN-major, TMA-aligned: expected strides \(1, 4\)"),
    (lambda a, s, b, t: K.fp8_gemm_nt((a, s), (b, t), torch.empty(4, 200)), r"d: expected shape \(4, 256\)"),
])
def test_gemm_errors_name_the_argument_and_the_layout(call, message):
    a_q, sfa, b_q, sfb = fp8_pair(4, 256, 256, seed=2)
    if "sfb" in message:
        sfb = torch.ones(3, 2)
    with pytest.raises(ValueError, match=message):
        call(a_q, sfa, b_q, sfb)


def test_contiguous_layout_refuses_misaligned_segments():
    a_q, sfa, b_q, sfb = fp8_pair(256, 128, 128, seed=3)
    b = (torch.stack([b_q, b_q]), torch.stack([sfb, sfb]))
    m_indices = torch.tensor([0] * 100 + [1] * 156, dtype=torch.int32)  # expert 1 starts inside block 0
    with pytest.raises(ValueError, match=r"rows 0..127 hold experts \[0, 1\].*misaligned segments"):
        K.m_grouped_fp8_gemm_nt_contiguous((a_q, sfa), b, torch.empty(256, 128), m_indices)
    with pytest.raises(ValueError, match="M = 200 rows is not a multiple of 128"):
        K.m_grouped_fp8_gemm_nt_contiguous((a_q[:200], sfa[:200]), b, torch.empty(200, 128), m_indices[:200])


def test_grouped_gemms_equal_one_plain_gemm_per_expert():
    counts = [100, 0, 128, 1, 130]
    g = torch.Generator().manual_seed(5)
    experts = [quantize_weight(torch.randn(192, 256, generator=g) * 0.1) for _ in counts]
    b = (torch.stack([w for w, _ in experts]), torch.stack([s for _, s in experts]))
    m_indices, rows = contiguous_layout(counts)
    a_q, sfa = quantize_activation(torch.randn(len(m_indices), 256, generator=g))
    d = K.m_grouped_fp8_gemm_nt_contiguous((a_q, sfa), b, torch.full((len(m_indices), 192), 7.0), m_indices)
    for e, (w, s) in enumerate(experts):
        mine = (m_indices == e).nonzero().flatten()
        if len(mine):
            assert torch.equal(d[mine], K.fp8_gemm_nt((a_q[mine], sfa[mine]), (w, s), torch.empty(len(mine), 192)))
    assert (d[m_indices < 0] == 0).all()  # padding rows
    # masked: the same experts, each in its own slab of M_max rows, rows past masked_m untouched
    slabs = torch.zeros(len(counts), 131, 256, dtype=torch.uint8).view(a_q.dtype)
    slab_s = torch.ones(len(counts), 131, 2)
    for e, c in enumerate(counts):
        mine = (m_indices == e).nonzero().flatten()
        slabs[e, :c], slab_s[e, :c] = a_q[mine], sfa[mine]
    masked = K.m_grouped_fp8_gemm_nt_masked((slabs, slab_s), b, torch.full((5, 131, 192), 7.0),
                                            torch.tensor(counts, dtype=torch.int32), 72)
    for e, c in enumerate(counts):
        assert torch.equal(masked[e, :c], d[(m_indices == e).nonzero().flatten()]) and (masked[e, c:] == 7).all()


# ------------------------------------------------------------------------------------ DeepEP semantics
def routed(ranks, n, k, experts, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n + r, hidden, generator=g) for r in range(ranks)]
    idx = [torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n + r)]) for r in range(ranks)]
    for r in range(ranks):
        idx[r][0, -1] = -1  # a token with one expert fewer
    ws = [torch.rand(n + r, k, generator=g) for r in range(ranks)]
    return xs, idx, ws


def test_normal_dispatch_and_combine_follow_deepep():
    xs, idx, ws = routed(ranks=4, n=6, k=3, experts=8, hidden=256, seed=0)
    got = K.dispatch(xs, idx, ws, num_experts=8)
    for dst, rec in enumerate(got):
        expected = [(src, t) for src in range(4) for t in range(len(xs[src]))
                    if any(0 <= e and e // 2 == dst for e in idx[src][t].tolist())]  # rank order, token order
        assert list(zip(rec.handle["src_rank"].tolist(), rec.handle["src_token"].tolist(), strict=True)) == expected
        assert torch.equal(rec.recv_x, torch.stack([xs[s][t] for s, t in expected]))
        for row, (s, t) in enumerate(expected):
            for j, e in enumerate(idx[s][t].tolist()):
                local = e >= 0 and e // 2 == dst
                assert rec.recv_topk_idx[row, j] == (e - 2 * dst if local else -1)
                assert rec.recv_topk_weights[row, j] == (ws[s][t, j] if local else 0)
        assert rec.num_recv_tokens_per_expert_list == [int((rec.recv_topk_idx == e).sum()) for e in range(2)]
    combined = K.combine([r.recv_x for r in got], [r.handle for r in got], [r.recv_topk_weights for r in got])
    for src in range(4):  # every copy comes back unweighted and is summed: x times the ranks it went to
        ranks = K.get_dispatch_layout(idx[src], 8, 4)[3].sum(1, keepdim=True)
        assert torch.allclose(combined[src][0], xs[src] * ranks, rtol=1e-6)
        assert torch.allclose(combined[src][1], ws[src] * (idx[src] >= 0), rtol=1e-6)


@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_dispatch_and_weighted_combine_follow_deepep(use_fp8):
    xs, idx, ws = routed(ranks=2, n=5, k=3, experts=4, hidden=256, seed=1)
    got = K.low_latency_dispatch(xs, idx, num_max_dispatch_tokens_per_rank=8, num_experts=4, use_fp8=use_fp8)
    payload = [ep.dequantize_payload(ep.per_token_fp8(x)) if use_fp8 else x for x in xs]
    for dst, rec in enumerate(got):
        for le in range(2):
            expected = [(s, t) for s in range(2) for t in range(len(xs[s])) if dst * 2 + le in idx[s][t].tolist()]
            assert rec.recv_count[le] == len(expected)
            values = (ep.dequantize_payload(rec.recv_x) if use_fp8 else rec.recv_x)[le, : len(expected)]
            assert torch.equal(values, torch.stack([payload[s][t] for s, t in expected]))
            first = 0
            for s in range(2):
                count = sum(1 for src, _ in expected if src == s)
                assert int(rec.handle["layout_range"][le, s]) == (first << 32) | count
                first += count
    # experts that double their input: combine gives sum_k w * 2 * x
    outs = [2 * ep.dequantize_payload(r.recv_x) for r in got]
    combined = K.low_latency_combine(outs, idx, ws, [r.handle for r in got])
    for s in range(2):
        weight = (ws[s] * (idx[s] >= 0)).sum(1, keepdim=True)
        assert torch.allclose(combined[s], 2 * weight * payload[s], rtol=1e-6, atol=1e-6)


def test_distributed_dispatch_and_combine_equal_the_single_process_ones(tmp_path):
    """World 2 and 4 on gloo (OMP_NUM_THREADS=1, a timeout on the process group): every rank's received
    tensors and combined results equal the single-process functions' exactly."""
    for world in (2, 4):
        procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "ep_worker.py"), str(world), str(rank),
                                   str(tmp_path / f"w{world}")], env={"OMP_NUM_THREADS": "1", "PATH": ""},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]
        logs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, logs, strict=True):
            assert p.returncode == 0, err[-3000:]
            assert "equal" in out


# ------------------------------------------------------------------------- the model through your kernel
def test_the_model_runs_through_the_reference_ops_unchanged():
    cfg = tiny_config()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    fp8 = random_dsv3ref(cfg, gemm_impl="fp8")
    grouped = random_dsv3ref(cfg, moe_impl="grouped")
    want_fp8, want_grouped = fp8(ids), grouped(ids)
    with K.use(fp8_gemm=K.fp8_gemm_nt, grouped_gemm=K.m_grouped_bf16_gemm_nt_contiguous):
        assert torch.equal(fp8(ids), want_fp8)  # the same float32 block accumulation
        assert rel_err(grouped(ids), want_grouped) < 1e-6  # per-expert matmuls vs torch's grouped_mm
    with pytest.raises(ValueError, match="use: found op 'flash_mla'"):
        with K.use(flash_mla=K.flash_mla_with_kvcache):
            pass


def planted_run(model, ids, paged, **ops):
    def run():
        cache = model.new_cache(ids.shape[0], ids.shape[1], kind="paged") if paged else None
        return trace(model, ids, ops=True, **({"cache": cache} if paged else {}))
    reference = run()
    with K.use(**ops):
        return compare(reference, run(), rtol=1e-4)


def test_compare_names_the_layer_and_op_of_each_planted_kernel_bug():
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    cfg = tiny_config(hidden_size=256, max_position_embeddings=256)
    absorb = random_dsv3ref(cfg, attn_impl="absorb", attn_order="absorbed")
    result = planted_run(absorb, ids, True, mla_decode=planted.mla_decode_floor_blocks)
    assert result.first_divergence == "model.layers.0.self_attn.o_proj:input"  # the attention core's output
    assert all(r.ok for r in result.rows[: [r.key for r in result.rows].index(result.first_divergence)])
    result = planted_run(random_dsv3ref(cfg, gemm_impl="fp8"), ids, False, fp8_gemm=planted.fp8_gemm_sfa_k_major)
    assert result.first_divergence == "model.layers.0.self_attn.q_a_proj"  # K = hidden_size = 256: two blocks
    result = planted_run(random_dsv3ref(cfg, moe_impl="grouped"), ids, False,
                         grouped_gemm=planted.grouped_contiguous_shifted_index)
    assert result.first_divergence == "model.layers.1.mlp.experts"  # the first MoE layer; router and shared agree
    assert all(r.ok for r in result.rows if r.key.startswith("model.layers.1.mlp.shared_experts"))


# ---------------------------------------------------------------------------------------- the check CLI
@pytest.mark.parametrize("op,reference,bug,passing", [
    ("mla_decode", "dsv3ref.kernels:flash_mla_with_kvcache", "dsv3ref.kernels.planted:mla_decode_floor_blocks",
     "whole pages only"),
    ("fp8_gemm", "dsv3ref.kernels:fp8_gemm_nt", "dsv3ref.kernels.planted:fp8_gemm_sfa_k_major", "K of one block"),
    ("grouped_contiguous", "dsv3ref.kernels:m_grouped_fp8_gemm_nt_contiguous",
     "dsv3ref.kernels.planted:grouped_contiguous_shifted_index", None),
    ("grouped_masked", "dsv3ref.kernels:m_grouped_fp8_gemm_nt_masked",
     "dsv3ref.kernels.planted:grouped_masked_one_short", None),
])
def test_check_cli_passes_the_reference_and_fails_the_planted_bug_on_the_right_cases(op, reference, bug, passing):
    ok = subprocess.run([sys.executable, "-m", "dsv3ref.kernels.check", reference, "--op", op], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "FAIL" not in ok.stdout and ok.stderr == "", ok.stdout + ok.stderr
    broken = subprocess.run([sys.executable, "-m", "dsv3ref.kernels.check", bug, "--op", op], capture_output=True,
                            text=True, timeout=120)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    for line in broken.stdout.splitlines()[:-1]:
        expect_pass = passing is not None and passing in line
        assert line.startswith("ok  " if expect_pass else "FAIL"), line
        if not expect_pass:
            assert "expected" in line and "found" in line  # where, and the two values


def test_check_cli_names_a_function_it_cannot_load():
    bad = subprocess.run([sys.executable, "-m", "dsv3ref.kernels.check", "no_such_module:f", "--op", "fp8_gemm"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot load 'no_such_module:f'" in bad.stderr


def test_the_check_sweep_runs_in_process_too():
    results = run_check(K.fp8_gemm_nt, "fp8_gemm")
    assert results and all(r.ok for r in results)


def test_generation_over_the_paged_cache_gives_the_static_cache_tokens():
    cfg = mtp_config(max_position_embeddings=256)
    model = random_dsv3ref(cfg, attn_impl="absorb", attn_order="absorbed").double()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 70, 1)]
    for speculative in (False, True):  # speculative: the MTP module's layer pages its cache too
        static = dsv3ref.generate(model, prompts, 12, eos_token_id=[], speculative=speculative)
        paged = dsv3ref.generate(model, prompts, 12, eos_token_id=[], speculative=speculative, cache_kind="paged")
        assert paged.tokens == static.tokens
    with pytest.raises(ValueError, match="cache_kind='paged' with compile=True"):
        dsv3ref.generate(model, prompts, 2, cache_kind="paged", compile=True)
    with pytest.raises(ValueError, match="cache_kind: found 'pages'"):
        dsv3ref.generate(model, prompts, 2, cache_kind="pages")


def test_cli_generates_the_same_text_over_the_paged_cache():
    def run(*extra):
        return subprocess.run([sys.executable, "-m", "dsv3ref", "generate", "--prompt", "Hello", "--max-new-tokens",
                               "6", *extra], capture_output=True, text=True, timeout=120)
    static, paged = run(), run("--cache", "paged")
    assert paged.returncode == 0 and paged.stdout == static.stdout and "paged latent cache" in paged.stderr
    naive = run("--cache", "paged", "--attn-impl", "naive")
    assert naive.returncode == 2 and "--cache paged: pages the latent cache of --attn-impl absorb" in naive.stderr
