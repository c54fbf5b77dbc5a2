"""Multi-head latent attention: the module against per-head attention in float64, and the absorbed
implementation (each order) against the naive one.

Tolerances: float32 logits agree to a relative error (max |diff| / max |ref|) below 1e-5 -- the
paths differ only in the order of float32 sums; float64 naive vs absorbed agree below 1e-12.
"""

import math

import pytest
import torch
from helpers import random_dsv3ref, rel_err, stacked_expert_grads, tiny_config

from dsv3ref import DeepseekV3
from dsv3ref.mla import MLA
from dsv3ref.moe import LoopExperts
from dsv3ref.rope import RotaryEmbedding, apply_rope, softmax_scale


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


def pair(cfg, seed=0, dtype=torch.float32, order="absorbed"):
    """The same random weights under attn_impl naive and absorb; the absorbed model computes every
    chunk in `order` ("absorbed": W^UK/W^UV folded even for prefill; "auto": the cheaper order)."""
    naive = random_dsv3ref(cfg, seed=seed).to(dtype)
    absorb = DeepseekV3(cfg, attn_impl="absorb").to(dtype).eval()
    absorb.load_state_dict(naive.state_dict())
    absorb.set_attn_order(order)
    return naive, absorb


@pytest.mark.parametrize("order", ["absorbed", "auto"])
@pytest.mark.parametrize("changes", [dict(), dict(q_lora_rank=None, rope_scaling=None), dict(v_head_dim=28)])
def test_absorbed_matches_naive_on_prefill_and_every_decode_step(changes, order):
    cfg = tiny_config(**changes)
    naive, absorb = pair(cfg, order=order)
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        assert rel_err(absorb(ids), naive(ids)) < 1e-5  # no cache
        caches = naive.new_cache(2, 30), absorb.new_cache(2, 30)
        a = naive(ids[:, :20], caches[0], 0)
        b = absorb(ids[:, :20], caches[1], 0)
        assert rel_err(b, a) < 1e-5
        for p in range(20, 30):
            a = naive(ids[:, p:p + 1], caches[0], p)
            b = absorb(ids[:, p:p + 1], caches[1], p)
            assert rel_err(b, a) < 1e-5


def test_auto_order_absorbs_for_decode_and_expands_for_prefill():
    from dsv3ref.mla import absorbed_is_cheaper

    v3 = dict(r=512, h=128, dn=128, dr=64, dv=128)  # DeepSeek-V3's attention
    assert absorbed_is_cheaper(1, 4096, **v3) and absorbed_is_cheaper(4, 4096, **v3)
    assert not absorbed_is_cheaper(4096, 4096, **v3) and not absorbed_is_cheaper(1, 1, **v3)


@pytest.mark.parametrize("order", ["absorbed", "auto"])
def test_float64_naive_and_absorbed_agree_to_1e12(order):
    cfg = tiny_config()
    naive, absorb = pair(cfg, dtype=torch.float64, order=order)
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    with torch.no_grad():
        assert rel_err(absorb(ids), naive(ids)) < 1e-12


def test_bf16_attention_takes_its_softmax_in_float32_as_deepseek_does():
    """DeepSeek's MLA (and HF's eager attention) compute bf16 scores, then
    softmax(scores * scale, dim=-1, dtype=float32) cast back to bf16: written out here, it must equal
    dsv3ref's bf16 naive attention bit for bit (a softmax taken in bf16 rounds scores * scale first)."""
    cfg = tiny_config()
    mla = MLA(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    q = (torch.randn(2, 7, cfg.num_attention_heads, cfg.qk_head_dim, generator=g) * 3).to(torch.bfloat16)
    k = (torch.randn(2, 7, cfg.num_attention_heads, cfg.qk_head_dim, generator=g) * 3).to(torch.bfloat16)
    v = torch.randn(2, 7, cfg.num_attention_heads, cfg.v_head_dim, generator=g).to(torch.bfloat16)
    mask = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7)
    scores = torch.einsum("bthd,bshd->bhts", q, k)  # bf16, as the model computes them
    probs = (scores.float() * softmax_scale(cfg)).masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    expected = torch.einsum("bhts,bshd->bthd", probs.to(torch.bfloat16), v).flatten(2)
    assert torch.equal(mla.attend_naive(q, k, v, mask), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_training_softmax_equals_masked_fill_bit_for_bit_forward_and_backward(dtype):
    """With autograd recording, the mask is added as a 0 / -inf bias fused with the scale (one pass each
    way); written out here the masked_fill recipe, with its gradient, must give the same bits, for a
    causal mask and an arbitrary one (every row keeps at least one key)."""
    cfg = tiny_config()
    mla = MLA(cfg).to(dtype)
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(2, cfg.num_attention_heads, 9, 9, generator=g) * 4).to(dtype)
    causal = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 9, 9)
    arbitrary = torch.rand(2, 9, 9, generator=g) < 0.5
    arbitrary[..., 0] = True
    for mask in (causal, arbitrary):
        a = scores.clone().requires_grad_()
        b = scores.clone().requires_grad_()
        ours = mla._softmax(a, mask, dtype)
        compute = torch.promote_types(dtype, torch.float32)
        expected = (b.to(compute) * softmax_scale(cfg)).masked_fill(~mask[:, None], float("-inf")).softmax(-1).to(dtype)
        assert torch.equal(ours, expected)
        with torch.no_grad():  # the inference path is the recipe itself
            assert torch.equal(mla._softmax(scores, mask, dtype), expected)
        grad = torch.randn(ours.shape, generator=g).to(dtype)
        ours.backward(grad)
        expected.backward(grad)
        assert torch.equal(a.grad, b.grad)
    # The bias is made once per mask and reused by every layer: a mask changed in place (or another
    # compute dtype) must not find the old one.
    mask = causal.clone()
    first = mla._softmax(scores.clone().requires_grad_(), mask, dtype)
    assert torch.equal(mla._softmax(scores.clone().requires_grad_(), mask, dtype), first)
    mask[:, 4, :3] = False
    again = mla._softmax(scores.clone().requires_grad_(), mask, dtype)
    with torch.no_grad():
        assert torch.equal(again, mla._softmax(scores, mask, dtype)) and not torch.equal(again, first)
    wide = mla._softmax(scores.double().requires_grad_(), mask, torch.float64)
    assert wide.dtype == torch.float64 and torch.allclose(wide, again.double(), atol=1e-2)


def _gradients(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, the loop experts' stacked as the grouped layout holds them
    (`experts.gate_up_proj`, `experts.down_proj`; an expert no token chose: zeros)."""
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, LoopExperts):
            grads[f"{name}.gate_up_proj"], grads[f"{name}.down_proj"] = stacked_expert_grads(module)
    for name, p in model.named_parameters():
        if ".experts." not in name or not name.split(".experts.")[1].split(".")[0].isdigit():
            grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return grads


def _trained_once(cfg, dtype: torch.dtype, ids: torch.Tensor, **impl) -> tuple[torch.Tensor, dict]:
    """The training loss (main + MTP, as the training loop takes it) of the seeded random model built
    with `impl`, and every parameter's gradient after its backward."""
    model = DeepseekV3(cfg, **impl)
    model.load_state_dict(random_dsv3ref(cfg, seed=21).state_dict())
    model = model.to(dtype).train()
    loss = model.loss(ids)["loss"]
    loss.backward()
    return loss.detach(), _gradients(model)


@pytest.mark.parametrize("impl", [dict(attn_impl="absorb", attn_order="expanded"),
                                  dict(attn_impl="absorb", attn_order="absorbed"),
                                  dict(attn_impl="absorb", moe_impl="grouped")])
def test_training_through_absorb_gives_the_readable_gradients(impl):
    """Training with attn_impl="absorb": the expanded order runs torch's fused attention kernel forward
    and backward (values zero-padded to the keys' width), the absorbed order folds W^UK and W^UV
    into the query and output; "auto" (what a training step with t = s takes) is the expanded order
    at this size, here with the grouped experts as well (benchmarks/train_step.py's fastest step).
    The loss (main + MTP) and every parameter's gradient must be the readable model's (naive
    attention, loop experts): in float64 to a relative error of 1e-10 (the paths differ only in the
    order of sums); in float32 each path's error against float64's readable gradients stays within
    1e-4 of the largest gradient of its tensor (measured: 6e-6 expanded, 1e-5 absorbed, against 7e-6 for
    the readable model in float32)."""
    cfg = tiny_config(num_nextn_predict_layers=1)  # v_head_dim 10 < qk_head_dim 20: the padded values
    ids = torch.randint(0, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(4))
    reference, want = _trained_once(cfg, torch.float64, ids)
    if impl.get("moe_impl") != "grouped":
        model = DeepseekV3(cfg, **impl)
        assert model.model.layers[0].self_attn._absorbed(23, 23, torch.float64) == (impl["attn_order"] == "absorbed")
    loss, got = _trained_once(cfg, torch.float64, ids, **impl)
    assert got.keys() == want.keys()
    assert rel_err(loss, reference) < 1e-12
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-10, name
    loss, got = _trained_once(cfg, torch.float32, ids, **impl)
    assert rel_err(loss, reference) < 1e-5
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-4, name


def test_fused_attention_skips_a_causal_mask_with_the_same_bits():
    """attend_fused hands torch's kernel is_causal=True instead of the mask when the mask is the plain
    causal one (a chunk without a cache): the same bits forward and backward on a CPU as with the
    mask read (masked keys add exp(-inf) = 0 either way). Any other mask is read: a cached chunk's
    (t < s), an arbitrary one, and the causal mask changed in place after it was first seen."""
    from dsv3ref import mla as mla_module

    cfg = tiny_config()
    attn = MLA(cfg)
    b, t, h = 2, 33, cfg.num_attention_heads
    g = torch.Generator().manual_seed(8)
    q, k = (torch.randn(b, t, h, cfg.qk_head_dim, generator=g) for _ in range(2))
    v = torch.randn(b, t, h, cfg.v_head_dim, generator=g)
    causal = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t).clone()
    assert mla_module._plainly_causal(causal)
    assert not mla_module._plainly_causal(causal[:, 5:])  # a chunk after 5 cached keys: t < s
    arbitrary = torch.rand(b, t, t, generator=g) < 0.5
    arbitrary[..., 0] = True
    assert not mla_module._plainly_causal(arbitrary)

    def run(mask, read_mask: bool):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        if read_mask:  # the mask handed to the kernel, as any mask that is not plainly causal is
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(mla_module, "_plainly_causal", lambda m: False)
                out = attn.attend_fused(*leaves, mask)
        else:
            out = attn.attend_fused(*leaves, mask)
        out.backward(torch.ones_like(out))
        return out, [x.grad for x in leaves]

    out, grads = run(causal, read_mask=False)
    want, want_grads = run(causal, read_mask=True)
    assert torch.equal(out, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
    assert rel_err(out, attn.attend_naive(q, k, v, causal)) < 1e-5
    causal[1, 20, 3] = False  # changed in place: read again, and now read by the kernel
    assert not mla_module._plainly_causal(causal)
    assert rel_err(attn.attend_fused(q, k, v, causal), attn.attend_naive(q, k, v, causal)) < 1e-5
    with torch.inference_mode():  # (generate's mode: its tensors keep no version, so the check runs each call)
        mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t).clone()
        assert mla_module._plainly_causal(mask)
        assert torch.equal(attn.attend_fused(q, k, v, mask), want.detach())
        mask[0, 3, 1] = False
        assert not mla_module._plainly_causal(mask)
