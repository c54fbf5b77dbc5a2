"""RMSNorm against its formula in float64 (eps placement included) and against HF's module in bf16."""

import torch
from helpers import rel_err

from dsv3ref.norm import RMSNorm


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


def test_rmsnorm_fused_path_equals_the_written_out_lines_bit_for_bit():
    """float32 and float64 go through torch's F.rms_norm; it must compute exactly the module's lines
    (statistics, rsqrt, then the weight), forward and backward, at several widths and scales."""
    for dtype in (torch.float32, torch.float64):
        for dim, scale in ((64, 1.0), (7, 1e-3), (1024, 30.0)):
            norm = RMSNorm(dim, eps=1e-6).to(dtype)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.3 * torch.randn(dim, dtype=dtype))
            w = norm.weight.detach().clone().requires_grad_()
            x = (scale * torch.randn(3, 5, dim, dtype=dtype)).requires_grad_()
            x2 = x.detach().clone().requires_grad_()
            ours = norm(x)
            lines = w * (x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6))
            assert torch.equal(ours, lines), (dtype, dim)
            g = torch.randn_like(ours)
            ours.backward(g)
            lines.backward(g)
            assert torch.equal(x.grad, x2.grad) and torch.equal(norm.weight.grad, w.grad), (dtype, dim)
