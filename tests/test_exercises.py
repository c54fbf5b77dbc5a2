"""The course's exercises (dsv3ref.exercises, notebooks/exercises/): every solution passes its checker,
a wrong answer is told where it first differs and, for the mistakes implementers make, which mistake it
is; a stub is "not written yet"; each exercise notebook, with its stub replaced by the solution, ends
passing. The checkers' references are themselves held against dsv3ref's own code here."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
import torch

import dsv3ref
from dsv3ref import exercises
from dsv3ref.fp8 import quantize_activation, quantize_weight
from dsv3ref.router import select_experts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks" / "exercises"))
import solutions  # noqa: E402

EXERCISE_NOTEBOOKS = sorted((ROOT / "notebooks" / "exercises").glob("*.ipynb"))
SOLVED = {"routing": (solutions.route,), "absorbed_attention": (solutions.absorbed_attention,),
          "mtp_combine": (solutions.mtp_combine,), "bug_hunt": (solutions.diagnose,),
          "quantization": (solutions.quantize_weight, solutions.quantize_activation)}


@pytest.mark.parametrize("name", sorted(SOLVED))
def test_every_solution_passes_its_checker(name):
    verdict = exercises.CHECKERS[name](*SOLVED[name])
    assert verdict.passed and verdict.written, verdict.message
    assert "passed all" in str(verdict)


def test_a_stub_is_not_written_yet_rather_than_wrong():
    def stub(*args, **kwargs):
        raise NotImplementedError

    for name, fns in SOLVED.items():
        verdict = exercises.CHECKERS[name](*(stub for _ in fns))
        assert not verdict.passed and not verdict.written and "not written yet" in verdict.message, name


def _route_variant(**change):
    def route(scores, bias, n_group, topk_group, top_k, scaling):
        kw = dict(use_bias=True, groups=True, group_rule="top2")
        kw.update({k: v for k, v in change.items() if k in kw})
        ids, w = exercises.reference_route(scores, bias, n_group, topk_group, top_k, scaling, **kw)
        s = scores.gather(1, ids)
        if change.get("biased_weights"):
            b = s + bias[ids]
            w = b / b.sum(-1, keepdim=True) * scaling
        if change.get("no_scaling"):
            w = s / s.sum(-1, keepdim=True)
        if change.get("off_by_one_expert"):
            ids = ids.clone()
            ids[-1, -1] = (ids[-1, -1] + 1) % scores.shape[1] if (ids[-1, -1] + 1) % scores.shape[1] not in ids[-1] \
                else ids[-1, -1]
        return ids, w
    return route


@pytest.mark.parametrize("change, expected", [
    (dict(use_bias=False), ["case 1 of 7", "output ids[", "without the bias"]),
    (dict(groups=False), ["output ids[", "without the group limit"]),
    (dict(group_rule="max"), ["output ids[", "sum of their two best biased scores"]),
    (dict(biased_weights=True), ["output weights[", "expected", "got", "bias chooses but never weighs"]),
    (dict(no_scaling=True), ["case 1 of 7", "output weights[0, 0]", "routed_scaling_factor is missing"]),
])
def test_a_wrong_router_is_told_where_and_what(change, expected):
    verdict = exercises.check_routing(_route_variant(**change))
    assert not verdict.passed and verdict.written and verdict.inputs, verdict.message
    for text in expected:
        assert text in verdict.message, (text, verdict.message)


def test_the_router_checker_accepts_any_choice_among_exact_ties_and_refuses_a_worse_one():
    scores = torch.tensor([[0.5, 0.5, 0.25, 0.25, 0.75, 0.25, 0.5, 0.5]], dtype=torch.float64)
    bias = torch.zeros(8, dtype=torch.float64)
    # 4 groups of 2 (scores 1.0, 0.5, 1.0, 1.0): keep 2 of the three tied groups {0, 2, 3}, choose 2 experts
    # the best (0.75 in group 2) and any 0.5 from group 0 or 3
    for got in ([4, 0], [4, 1], [4, 6], [4, 7]):
        assert exercises._valid_tie(scores[0], bias, 4, 2, got), got
    assert exercises._valid_tie(scores[0], bias, 4, 2, [0, 1])  # groups 0 and 3 kept (3 beats 2 on a tie)
    for got in ([4, 5], [0, 5], [4, 2]):  # 0.25 over a 0.5; 0.25 over the 0.75; group 1 is not among the best
        assert not exercises._valid_tie(scores[0], bias, 4, 2, got), got


def test_the_routing_reference_is_dsv3refs_router():
    g = torch.Generator().manual_seed(0)
    scores = torch.sigmoid(torch.randn(40, 64, generator=g, dtype=torch.float64))
    bias = 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    ids, w = exercises.reference_route(scores, bias, 8, 3, 6, 2.5)
    assert torch.equal(ids, select_experts(scores, bias, top_k=6, n_group=8, topk_group=3))
    s = scores.gather(1, ids)
    assert torch.allclose(w, s / s.sum(-1, keepdim=True) * 2.5, rtol=0, atol=1e-15)


@pytest.mark.parametrize("change, expected", [
    (dict(extra=-1), "one position fewer"), (dict(extra=1), "one position more"),
    (dict(extra=10**9), "over the whole cache"), (dict(rope=False), "without the rotary half"),
    (dict(scale=False), "without softmax_scale"),
])
def test_a_wrong_attention_is_told_where_and_what(change, expected):
    def wrong(**x):
        return exercises.reference_attention(**x, **change)
    verdict = exercises.check_absorbed_attention(wrong)
    assert not verdict.passed and "output out[" in verdict.message and "expected" in verdict.message
    assert expected in verdict.message, verdict.message


def test_the_attention_reference_is_dsv3refs_mla_on_the_same_latent():
    """reference_attention against dsv3ref.mla's absorbed attention over a latent cache."""
    from dsv3ref.mla import MLA
    cfg = dsv3ref.ModelConfig.preset("tiny")
    torch.manual_seed(0)
    attn = MLA(cfg, attn_impl="absorb").double()
    b, s, h = 2, 7, cfg.num_attention_heads
    q_nope = torch.randn(b, 1, h, cfg.qk_nope_head_dim, dtype=torch.float64)
    q_rope = torch.randn(b, 1, h, cfg.qk_rope_head_dim, dtype=torch.float64)
    c_kv = torch.randn(b, s, cfg.kv_lora_rank, dtype=torch.float64)
    k_rope = torch.randn(b, s, cfg.qk_rope_head_dim, dtype=torch.float64)
    lengths = torch.tensor([4, 7])
    mask = (torch.arange(s)[None, None, :] < lengths[:, None, None])
    ours = attn.attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask).view(b, h, -1)
    ref = exercises.reference_attention(q_nope[:, 0], q_rope[:, 0], c_kv, k_rope, lengths, attn.kv_b_proj.weight,
                                        attn.softmax_scale)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("change, expected", [
    (dict(swapped=True), "embedding first"), (dict(shift=0), "embedding of the next token"),
    (dict(norms_swapped=True), "enorm and hnorm are exchanged"), (dict(no_eps=True), "without eps"),
])
def test_a_wrong_mtp_combine_is_told_where_and_what(change, expected):
    def wrong(**x):
        return exercises.reference_mtp_combine(**x, **change)
    verdict = exercises.check_mtp_combine(wrong)
    assert not verdict.passed and "output combined[" in verdict.message and expected in verdict.message, \
        verdict.message


def test_the_mtp_reference_is_dsv3refs_mtp_module():
    cfg = dsv3ref.ModelConfig.preset("tiny")
    torch.manual_seed(1)
    model = dsv3ref.DeepseekV3(cfg).double()
    layer = model.mtp_layers[0]
    with torch.no_grad():
        layer.enorm.weight.add_(0.3 * torch.randn(cfg.hidden_size, dtype=torch.float64))
        layer.hnorm.weight.add_(0.3 * torch.randn(cfg.hidden_size, dtype=torch.float64))
    hidden = torch.randn(6, cfg.hidden_size, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (6,))
    emb = model.model.embed_tokens.weight
    ours = layer.combine(hidden[None, :-1], emb[tokens[None, 1:]])[0]
    ref = exercises.reference_mtp_combine(hidden, tokens, emb, layer.enorm.weight, layer.hnorm.weight,
                                          layer.eh_proj.weight, cfg.rms_norm_eps)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)


def test_a_wrong_quantization_is_told_where_and_what():
    def inverse_scale(w):
        q, s = solutions.quantize_weight(w)
        return q, 1 / s

    def floor_blocks(w):
        q, s = solutions.quantize_weight(w)
        return q, s[: w.shape[0] // 128, : w.shape[1] // 128]

    def one_scale_for_every_tile(x):
        q, scale = solutions.quantize_activation(x)
        return (x.float() / scale[..., :1]).clamp(-448, 448).to(torch.float8_e4m3fn), scale

    def no_floor(w):
        q, s = solutions.quantize_weight(w)
        return q, torch.where(s == 1e-4 / 448.0, torch.zeros_like(s), s)

    cases = {inverse_scale: ["scale[0, 0] (elements [0:128, 0:128])", "448 / amax"],
             floor_blocks: ["case 2 of 7", "scale of shape (2, 1), expected (3, 2)", "ceil, not floor"],
             no_floor: ["case 3 of 7", "scale[1, 0]", "amax is floored at 1e-4"]}
    for fn, expected in cases.items():
        verdict = exercises.check_quantization(fn, solutions.quantize_activation)
        for text in expected:
            assert text in verdict.message, (fn.__name__, verdict.message)
    verdict = exercises.check_quantization(solutions.quantize_weight, one_scale_for_every_tile)
    assert "case 5 of 7" in verdict.message and "quantize_activation: q[0, 0, 128]: expected" in verdict.message
    assert "(byte 0x" in verdict.message, verdict.message


def test_the_quantization_reference_is_dsv3refs_fp8():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 200, generator=g)
    x = torch.randn(3, 5, 300, generator=g)
    for (q, s), (q2, s2) in ((exercises.reference_quantize(w, (128, 128)), quantize_weight(w)),
                             (exercises.reference_quantize(x, 128), quantize_activation(x))):
        assert torch.equal(s, s2) and torch.equal(q.view(torch.uint8), q2.view(torch.uint8))


def test_a_wrong_diagnosis_is_told_what_the_planted_bug_was_and_where_it_shows():
    def always_rope(reference, suspect, input_ids):
        return ("non_interleaved_rope", None)

    def wrong_layer(reference, suspect, input_ids):
        got = solutions.diagnose(reference, suspect, input_ids)
        return (got[0], 3 - got[1]) if got and got[1] else got

    verdict = exercises.check_bug_hunt(always_rope)
    assert not verdict.passed and "mystery 1" in verdict.message
    assert "the planted bug was ('swapped_shared_expert', 2)" in verdict.message
    assert "first diverges at 'model.layers.2.mlp.shared_experts" in verdict.message, verdict.message
    verdict = exercises.check_bug_hunt(wrong_layer)
    assert "you answered ('swapped_shared_expert', 1)" in verdict.message, verdict.message


def test_a_function_that_raises_is_named_with_its_case_and_inputs():
    def broken(scores, bias, n_group, topk_group, top_k, scaling):
        return solutions.route(scores, bias, n_group, topk_group, top_k, scaling) if scores.shape[0] else 1 / 0

    verdict = exercises.check_routing(broken)
    assert "case 7 of 7 (no tokens): your code raised ZeroDivisionError" in verdict.message
    assert verdict.case == "no tokens" and verdict.inputs["scores"].shape == (0, 64)


@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=[p.stem for p in EXERCISE_NOTEBOOKS])
def test_each_exercise_notebook_passes_with_its_stub_replaced_by_the_solution(path):
    """Run the notebook's code cells in one namespace, the stub cell (marked '# your answer') replaced by the
    solution's function of the same name; its last cell's verdict must then pass."""
    import matplotlib
    matplotlib.use("Agg")
    cells = [c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code"]
    stubs = [i for i, src in enumerate(cells) if "raise NotImplementedError" in src]
    assert stubs, f"{path.name}: no stub cell"
    namespace: dict = {}
    for i, src in enumerate(cells):
        if i in stubs:
            names = [line.split("(")[0].removeprefix("def ") for line in src.splitlines() if line.startswith("def ")]
            namespace.update({n: getattr(solutions, n) for n in names})
        else:
            exec(compile(src, f"{path.name} cell {i}", "exec"), namespace)
    assert namespace["verdict"].passed, namespace["verdict"].message
