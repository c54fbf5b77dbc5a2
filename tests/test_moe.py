"""The MoE layer against a dense all-experts computation, and grouped experts against the per-expert
loop (forward and gradients).

Tolerance: float32 outputs and gradients of the grouped and loop paths agree to a relative error
(max |diff| / max |ref|) below 1e-5 (they differ in summation order only); float64 below 1e-12.
"""

import pytest
import torch
from helpers import hf_model, rel_err, stacked_expert_grads, tiny_config

import dsv3ref
from dsv3ref import DeepseekV3
from dsv3ref.experts import StackedExperts, grouped_linear
from dsv3ref.mlp import MLP
from dsv3ref.moe import MoE


def moe_pair(cfg, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    loop = MoE(cfg, "loop").to(dtype)
    with torch.no_grad():
        for p in loop.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        loop.gate.e_score_correction_bias.copy_(0.3 * torch.randn(cfg.n_routed_experts, generator=g))
    grouped = MoE(cfg, "grouped").to(dtype)
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def check_forward_and_backward(loop, grouped, x, tol):
    for p in [*loop.parameters(), *grouped.parameters()]:
        p.grad = torch.zeros_like(p)  # experts that get no token keep a zero gradient
    xl, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_l, out_g = loop(xl), grouped(xg)
    assert rel_err(out_g, out_l) < tol
    upstream = torch.randn_like(out_l)
    (out_l * upstream).sum().backward()
    (out_g * upstream).sum().backward()
    assert rel_err(xg.grad, xl.grad) < tol
    loop_gate_up, loop_down = stacked_expert_grads(loop.experts)
    assert rel_err(grouped.experts.gate_up_proj.grad, loop_gate_up) < tol
    assert rel_err(grouped.experts.down_proj.grad, loop_down) < tol
    # with one normalized expert per token the gate value is 1 and the router's gradient is zero
    gate_l, gate_g = loop.gate.weight.grad, grouped.gate.weight.grad
    assert (gate_g - gate_l).abs().max() <= tol * max(gate_l.abs().max().item(), 1.0)


def test_mlp_is_swiglu():
    mlp = MLP(8, 16).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    a = x @ mlp.gate_proj.weight.T
    expected = ((a / (1 + torch.exp(-a))) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    assert rel_err(mlp(x), expected) < 1e-14


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loop_equals_deepseeks_per_expert_accumulation_bit_for_bit(dtype):
    """DeepSeek's inference MoE written out (inference/model.py: `y[idx] += expert(x[idx]) * weights[idx,
    top, None]`, expert after expert): the loop gives the same bits, in bf16 too, where each add rounds."""
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = MoE(cfg).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    tokens = torch.randn(300, cfg.hidden_size, dtype=dtype)
    weights, ids = moe.gate(tokens)
    expected = torch.zeros_like(tokens)
    for e, expert in enumerate(moe.experts):
        idx, top = torch.where(ids == e)
        expected[idx] += expert(tokens[idx]) * weights[idx, top, None].to(dtype)
    assert torch.equal(moe.experts(tokens, weights, ids), expected)


def test_loop_gathers_the_routed_tokens_once():
    # A gather per expert gives each its own zero-filled gradient of all n tokens in the backward pass
    # (one per expert: 8% of the `tiny` MoE layer's forward + backward); one gather, split, makes one.
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            zero_fill = func in (torch.ops.aten.new_zeros.default, torch.ops.aten.zeros.default,
                                 torch.ops.aten.zeros_like.default, torch.ops.aten.zero_.default)
            self.count += zero_fill and tuple(out.shape) == self.shape
            return out

    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = MoE(cfg)
    tokens = torch.randn(40, cfg.hidden_size, requires_grad=True)
    weights, ids = moe.gate(tokens)
    assert len(ids.unique()) > 4  # many experts get tokens
    out = moe.experts(tokens, weights, ids)
    with ZeroFills(tuple(tokens.shape)) as mode:
        out.backward(torch.ones_like(out))
    assert mode.count == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_grouped_matches_loop_forward_and_gradients(dtype, tol):
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, n_shared_experts=2)
    loop, grouped = moe_pair(cfg, dtype)
    check_forward_and_backward(loop, grouped, torch.randn(3, 17, cfg.hidden_size, dtype=dtype), tol)


def test_grouped_matches_loop_when_some_experts_get_no_tokens():
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=2)
    loop, grouped = moe_pair(cfg)
    with torch.no_grad():  # make group 0 the only one ever chosen
        for m in (loop, grouped):
            m.gate.e_score_correction_bias.copy_(torch.tensor([5.0] * 4 + [0.0] * 12))
    x = torch.randn(2, 9, cfg.hidden_size)
    with torch.no_grad():
        _, ids = grouped.gate(x.reshape(-1, cfg.hidden_size))
    assert set(ids.unique().tolist()) <= {0, 1, 2, 3}
    check_forward_and_backward(loop, grouped, x, 1e-5)


def test_grouped_matches_loop_when_all_tokens_pick_one_expert_and_batch_of_one():
    cfg = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=1)
    loop, grouped = moe_pair(cfg)
    with torch.no_grad():
        for m in (loop, grouped):
            m.gate.e_score_correction_bias.copy_(torch.tensor([0.0] * 5 + [10.0] + [0.0] * 2))
    x = torch.randn(1, 12, cfg.hidden_size)
    check_forward_and_backward(loop, grouped, x, 1e-5)
    check_forward_and_backward(loop, grouped, torch.randn(1, 1, cfg.hidden_size), 1e-5)


def test_grouped_linear_fallback_equals_grouped_mm():
    x = torch.randn(20, 16)
    w = torch.randn(5, 8, 16)
    counts = torch.tensor([3, 0, 9, 8, 0])
    expected = torch.cat([x[:3] @ w[0].T, x[3:12] @ w[2].T, x[12:20] @ w[3].T])
    assert rel_err(grouped_linear(x, w, counts), expected) < 1e-6  # grouped_mm (float32)
    assert rel_err(grouped_linear(x.double(), w.double(), counts), expected.double()) < 1e-6  # the fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # grouped_mm, and the per-expert fallback
@pytest.mark.parametrize("block_rows", [7, None])  # 3 * 13 tokens * 4 slots = 156 assignments: many runs, one run
def test_grouped_matches_loop_when_split_into_many_blocks(block_rows, dtype):
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    loop, grouped = moe_pair(cfg, dtype)
    grouped.experts.block_rows = block_rows
    x = torch.randn(3, 13, cfg.hidden_size, dtype=dtype)
    with torch.no_grad():  # inference cuts the runs; training takes one run of all experts (next test)
        assert rel_err(grouped(x), loop(x)) < 1e-5
    check_forward_and_backward(loop, grouped, x, 1e-5)


def test_runs_are_cut_on_a_cpu_only_and_one_run_never_reads_back_from_the_device():
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from dsv3ref.experts import CPU_BLOCK_ROWS, _grouped

    experts = StackedExperts(8, 64, 32).bfloat16()
    assert experts.rows_per_run(torch.device("cpu")) == CPU_BLOCK_ROWS == 2048
    assert experts.rows_per_run(torch.device("cuda")) is None  # one run of all assignments
    experts.block_rows = 100
    assert experts.rows_per_run(torch.device("cuda")) == 100
    # Fake tensors hold no values: any host read of the routing (a GPU synchronization) raises.
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        tokens = torch.randn(10, 64, dtype=torch.bfloat16)
        weights, ids = torch.rand(10, 2), torch.randint(0, 8, (10, 2))
        assert _grouped(tokens, weights, ids, experts.gate_up_proj, experts.down_proj, None).shape == (10, 64)
        with pytest.raises(DataDependentOutputException):  # runs are cut from the counts on the host
            _grouped(tokens, weights, ids, experts.gate_up_proj, experts.down_proj, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: torch's grouped_mm in bf16 on CUDA")
@pytest.mark.parametrize("block_rows", [None, 7])  # one run (the default on a GPU), many runs
def test_grouped_experts_on_cuda_equal_the_loop_on_the_cpu(block_rows):
    # widths whose bf16 rows are multiples of 16 bytes, as CUDA's grouped_mm requires
    cfg = tiny_config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, n_group=4, topk_group=2,
                      num_experts_per_tok=4)
    loop, grouped = moe_pair(cfg)
    grouped = grouped.to("cuda", torch.bfloat16)
    grouped.experts.block_rows = block_rows
    tokens = torch.randn(300, cfg.hidden_size)
    weights, ids = torch.rand(300, 4), torch.randint(0, 16, (300, 4))  # the same routing for both
    with torch.no_grad():
        expected = loop.experts(tokens.bfloat16().float(), weights, ids)
        got = grouped.experts(tokens.cuda().bfloat16(), weights.cuda(), ids.cuda())
    assert rel_err(got.float().cpu(), expected) < 2e-2  # bf16 weights and products (2^-8 relative each)


def consumers_of(output: torch.Tensor, param: torch.Tensor) -> set[str]:
    """The autograd nodes of output's graph that pass a gradient to `param` directly."""
    found, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if type(child).__name__ == "AccumulateGrad" and child.variable is param:
                found.add(node.name())
            stack.append(child)
    return found


@pytest.mark.parametrize("dtype,consumer", [(torch.float32, "TransposeBackward0"), (torch.float64, "UnbindBackward0")])
def test_grouped_training_takes_the_stacked_weights_whole(dtype, consumer):
    # A slice of a stacked weight per run of experts, or an index per expert (float64's fallback without
    # grouped_mm), would give each its own zero-filled gradient of the whole stack: at `small` 0.68 s of an
    # 8.8 s training step. float32: grouped_mm reads w.transpose(1, 2); float64: the weights unbound once.
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    _, grouped = moe_pair(cfg, dtype)
    grouped.experts.block_rows = 7  # would cut the assignments into many runs
    out = grouped(torch.randn(3, 13, cfg.hidden_size, dtype=dtype))
    for param in (grouped.experts.gate_up_proj, grouped.experts.down_proj):
        assert consumers_of(out, param) == {consumer}


def test_full_model_grouped_equals_loop_and_hf(tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg, tmp_path / "cfg", seed=12)
    hf.save_pretrained(tmp_path / "hf")
    loop = DeepseekV3.from_pretrained(tmp_path / "hf")
    grouped = DeepseekV3.from_pretrained(tmp_path / "hf", moe_impl="grouped", attn_impl="absorb")
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(loop(ids), expected) < 1e-5
        assert rel_err(grouped(ids), expected) < 1e-5
    # the stacked weights save back under the checkpoint's per-expert names
    dsv3ref.save_pretrained(grouped, tmp_path / "ours")
    again = DeepseekV3.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in loop.state_dict().items())


def test_stacked_weights_are_built_once_and_never_copied_in_forward(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = tiny_config(first_k_dense_replace=0, num_hidden_layers=1)
    torch.manual_seed(3)
    dsv3ref.save_pretrained(DeepseekV3(cfg), tmp_path)
    experts = DeepseekV3.from_pretrained(tmp_path, moe_impl="grouped").model.layers[0].mlp.experts
    weights = [experts.gate_up_proj, experts.down_proj]
    pointers = [w.data_ptr() for w in weights]
    # the checkpoint names in state_dict are views into the stacked tensors, not copies
    sd = experts.state_dict()
    assert sd["0.gate_proj.weight"].untyped_storage().data_ptr() == experts.gate_up_proj.data_ptr()
    assert sd["3.down_proj.weight"].untyped_storage().data_ptr() == experts.down_proj.data_ptr()
    one_expert = cfg.moe_intermediate_size * cfg.hidden_size

    class NewTensors(TorchDispatchMode):
        """Records the sizes of the tensors each op creates in fresh memory (views excluded)."""

        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), out.numel()))
            return out

    tokens = torch.randn(3, cfg.hidden_size)  # 3 tokens x 2 experts: every activation is smaller than one expert
    weights_, ids = torch.rand(3, 2), torch.tensor([[0, 1], [1, 2], [5, 0]])
    for _ in range(2):
        with torch.no_grad(), NewTensors() as seen:
            experts(tokens, weights_, ids)
        assert seen.sizes and max(n for _, n in seen.sizes) < one_expert, seen.sizes
    assert [w.data_ptr() for w in weights] == pointers


def test_every_stacked_expert_path_equals_the_loop_oracle():
    """The static-shape paths torch.compile uses (gathered at few assignments; dense on CUDA) and the
    grouped operator (`torch.ops.dsv3ref.grouped_experts`, CPU) against LoopExperts on the same weights."""
    torch.manual_seed(3)
    cfg = tiny_config()
    loop, grouped = MoE(cfg, "loop").eval(), MoE(cfg, "grouped").eval()
    with torch.no_grad():
        for p in loop.parameters():  # MoE's parameters start uninitialized (torch.empty)
            p.normal_(0, 0.2)
    grouped.load_state_dict(loop.state_dict())
    tokens = torch.randn(5, cfg.hidden_size)
    weights, ids = loop.gate(tokens)
    want = loop.experts(tokens, weights, ids).detach()
    stacked = grouped.experts
    op = torch.ops.dsv3ref.grouped_experts(tokens, weights, ids, stacked.gate_up_proj, stacked.down_proj, 2048)
    for got in (stacked.gathered(tokens, weights, ids), stacked.dense(tokens, weights, ids), op):
        assert rel_err(got, want) < 1e-6  # float32, other summation orders
