"""A sequence's logits do not depend on how it is fed: one chunk, one token at a time, uneven chunks,
or as one row of a larger batch. Checked for every way the model can compute (attention
implementation and order, expert implementation, GEMM implementation and FP8 kernel, dtype).

And with FP8 weights, each attention path computes what DeepSeek's own path of the same name
computes: "naive" quantizes the latent for the kv_b_proj FP8 GEMM, "absorb" applies the
dequantized kv_b_proj weight to the unquantized latent. Both formulas are written out here in
float64.

What "do not depend" can mean depends on the CPU's BLAS. A float32 GEMM of 1 row and of 12 rows may
round differently in the last bit (MKL on an AVX2 EPYC does; on the machine these tests were first
written on it did not), and where the model rounds again to a coarser grid -- bf16 activations, or
the E4M3 tiles an FP8 layer quantizes its input into -- a last-bit difference can move one value a
whole step (2^-8 in bf16, 2^-4 in E4M3), which the following layers carry to the logits (measured:
up to 5e-3 relative). So the bug this file guards against, a chunk computed another way than the
whole (which moved bf16 logits by 6e-3 to 6e-2), is caught three ways that hold on any CPU:

- float64, every combination: equal to 1e-10 (float64's rounding never reaches an E4M3 or bf16 step
  here; a wrong position, mask or cache entry moves logits by far more);
- the attention order each chunk takes is recorded: where the orders' rounding can show (bf16, FP8
  weights) every chunk of every feed takes the same one;
- float32 and bf16: within 1e-5 (float32 without FP8 layers: only the order of float32 sums
  differs; measured <= 6e-7) or 5e-2 (bf16, FP8 in float32: one rounding step carried through three
  layers; a wrong computation moves them by O(1)).
"""

import pytest
import torch
from einops import rearrange, repeat
from helpers import needs_cpu_scaled_mm, rel_err

from dsv3ref import DeepseekV3, generate
from dsv3ref.fp8 import E4M3, FP8Linear
from dsv3ref.mla import MLA

SEQ = 12
CHUNKINGS = {"single tokens": [1] * SEQ, "uneven chunks": [5, 1, 6]}


def load(folder, gemm, attn_impl, order, moe_impl, dtype):
    """gemm: "bf16" (weights dequantized on load), "fp8-emulate", "fp8-dequantize" or "fp8-scaled_mm"."""
    gemm_impl, _, kernel = gemm.partition("-")
    model = DeepseekV3.from_pretrained(folder, dtype=dtype, attn_impl=attn_impl, moe_impl=moe_impl,
                                       gemm_impl=gemm_impl, fp8_kernel=kernel or "emulate")
    if order is not None:
        model.set_attn_order(order)
    return model


def feed(model, ids, chunks):
    """Logits (b, SEQ, vocab) of ids fed through the cache in chunks of the given sizes."""
    cache = model.new_cache(ids.shape[0], SEQ)
    out, p = [], 0
    for c in chunks:
        out.append(model(ids[:, p:p + c], cache=cache, start_pos=p))
        p += c
    return torch.cat(out, dim=1)


ATTN = [("naive", None), ("absorb", "auto"), ("absorb", "absorbed"), ("absorb", "expanded")]
COMBOS = [pytest.param(gemm, attn, order, moe, dtype, id=f"{gemm}-{attn}-{order}-{moe}-{str(dtype)[6:]}",
                       marks=[needs_cpu_scaled_mm] if gemm == "fp8-scaled_mm" else [])
          for gemm in ("bf16", "fp8-emulate", "fp8-dequantize", "fp8-scaled_mm")
          for attn, order in ATTN
          for moe in (("loop", "grouped") if gemm == "bf16" else ("loop",))  # FP8 experts run as a loop
          for dtype in (torch.float64, torch.float32, torch.bfloat16)
          if not (gemm == "fp8-scaled_mm" and dtype == torch.float64)]  # torch's scaled_mm sums in float32


def tolerance(gemm: str, dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-10
    return 1e-5 if dtype == torch.float32 and gemm == "bf16" else 5e-2


@pytest.mark.parametrize("gemm,attn_impl,order,moe_impl,dtype", COMBOS)
def test_logits_do_not_depend_on_chunking_or_batch(fp8_folder, gemm, attn_impl, order, moe_impl, dtype,
                                                    monkeypatch):
    model = load(fp8_folder, gemm, attn_impl, order, moe_impl, dtype)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(7))
    tol = tolerance(gemm, dtype)
    orders = []  # (queries, keys, absorbed?) of every attention call
    decide = MLA._absorbed
    monkeypatch.setattr(MLA, "_absorbed", lambda self, t, s, dt: orders.append(decide(self, t, s, dt)) or orders[-1])
    with torch.no_grad():
        whole = feed(model, ids[:1], [SEQ])
        assert rel_err(model(ids[:1]), whole) < tol  # no cache at all
        for name, chunks in CHUNKINGS.items():
            assert rel_err(feed(model, ids[:1], chunks), whole) < tol, name
        # the same row inside a batch of three, fed as one chunk and token by token
        assert rel_err(feed(model, ids, [SEQ])[:1], whole) < tol
        assert rel_err(feed(model, ids, CHUNKINGS["uneven chunks"])[:1], whole) < tol
    if attn_impl == "absorb" and (dtype == torch.bfloat16 or gemm != "bf16"):
        assert len(set(orders)) == 1, f"the attention order changed between chunks: {sorted(set(orders))}"
    if attn_impl == "absorb" and order != "auto":
        assert set(orders) == {order == "absorbed"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_speculative_decoding_gives_plain_greedy_tokens(fp8_folder, dtype):
    """The verification pass is a chunk of D + 1 tokens, decoding a chunk of 1: both must give the
    same argmax, or speculation changes the text."""
    model = load(fp8_folder, "fp8-emulate", "absorb", "auto", "loop", dtype)
    prompt = [[5, 17, 3, 88, 41]]
    plain = generate(model, prompt, max_new_tokens=10, eos_token_id=[])
    spec = generate(model, prompt, max_new_tokens=10, eos_token_id=[], speculative=True)
    assert spec.tokens == plain.tokens


# ------------------------------------------------------- which of DeepSeek's paths each one computes
def fp8_linear_formula(x: torch.Tensor, layer: FP8Linear, quantize_input: bool) -> torch.Tensor:
    """x (..., K) times an FP8 layer's weight, in float64: the weight dequantized block by block
    (128 x 128, weight * weight_scale_inv); the input, if asked, rounded to E4M3 in 1 x 128 tiles with
    scale max(|tile|, 1e-4) / 448 (DeepSeek's act_quant; computed in float32 like its kernel)."""
    n, k = layer.weight.shape
    scales = repeat(layer.weight_scale_inv.double(), "nb kb -> (nb i) (kb j)", i=128, j=128)[:n, :k]
    w = layer.weight.double() * scales  # (N, K), exact in float64
    if quantize_input:
        pad = (-k) % 128
        tiles = rearrange(torch.nn.functional.pad(x.float(), (0, pad)), "... (t c) -> ... t c", c=128)
        s = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
        x = rearrange((tiles / s).to(E4M3).double() * s.double(), "... t c -> ... (t c)")[..., :k]
    return x.double() @ w.T


def mla_before_o_proj_formula(mla, x, cos, sin, quantize_latent: bool) -> torch.Tensor:
    """Multi-head attention (causal) with per-head keys [W^UK c ; k^R] and values W^UV c, where
    [W^UK; W^UV] c is `fp8_linear_formula(c, kv_b_proj)`. Returns (b, t, h * dv) float64."""
    h, dn, dv = mla.n_heads, mla.qk_nope_head_dim, mla.v_head_dim
    q_nope, q_rope = mla.query(x, cos, sin)  # shared by both paths (FP8 q projections), checked against HF elsewhere
    c_kv, k_rope = mla.latent(x, cos, sin)
    kv = rearrange(fp8_linear_formula(c_kv, mla.kv_b_proj, quantize_latent), "b s (h d) -> b s h d", h=h)
    k = torch.cat([kv[..., :dn], repeat(k_rope.double(), "b s d -> b s h d", h=h)], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1).double()
    t = x.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * mla.softmax_scale
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), kv[..., dn:dn + dv])
    return rearrange(out, "b t h d -> b t (h d)")


def o_proj_input(model, x):
    """What layer 0's attention hands to o_proj for hidden states x (b, t, dim)."""
    mla = model.model.layers[0].self_attn
    seen = []
    hook = mla.o_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    positions = torch.arange(x.shape[1])[None]
    cos, sin = model.rotary(positions, x.dtype)
    mask = torch.ones(1, x.shape[1], x.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        mla(x, cos, sin, mask)
    hook.remove()
    return seen[0], (cos, sin)


def test_fp8_naive_and_absorb_compute_deepseeks_naive_and_absorb_paths(fp8_folder):
    naive = load(fp8_folder, "fp8-emulate", "naive", None, "loop", torch.float64)
    x = torch.randn(1, 9, naive.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got, (cos, sin) = o_proj_input(naive, x)
    with torch.no_grad():
        quantized = mla_before_o_proj_formula(naive.model.layers[0].self_attn, x, cos, sin, quantize_latent=True)
        dense = mla_before_o_proj_formula(naive.model.layers[0].self_attn, x, cos, sin, quantize_latent=False)
    # The model's FP8 GEMM accumulates its K blocks in float32, as the hardware does.
    assert rel_err(got, quantized) < 1e-6
    assert rel_err(dense, quantized) > 1e-3  # the latent's quantization is visible: the formulas differ
    for order in ("auto", "absorbed", "expanded"):
        absorb = load(fp8_folder, "fp8-emulate", "absorb", order, "loop", torch.float64)
        got, _ = o_proj_input(absorb, x)
        assert rel_err(got, dense) < 1e-10, order  # float64 throughout, the dequantized weight exact
