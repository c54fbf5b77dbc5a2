"""Routed experts stacked into 3-D weights, computed with one grouped GEMM per projection.

The readable oracle (`dsv3ref.moe.LoopExperts`) visits the experts one by one. Here the (token, expert)
assignments are instead sorted by expert, so that each expert's tokens form one contiguous block of
rows, and every expert's matrix product runs in a single grouped GEMM over those blocks
(`torch.nn.functional.grouped_mm`, with `offs` marking where each block ends). The results are
multiplied by the gate values and summed back per token.

On a CPU, long batches are cut into runs of whole experts holding about `block_rows` assignments,
one grouped GEMM per run over just those experts; on a GPU one run takes them all (in bf16 with no
host synchronization: `StackedExperts.block_rows`).
The weights live stacked, created once: `gate_up_proj` (experts, 2 * inter, dim) holds each
expert's gate_proj and up_proj rows, `down_proj` (experts, dim, inter). Their state_dict still uses
the checkpoint's names (`{e}.gate_proj.weight`, ...), as views into the stacked tensors, so loading
and saving are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, reduce
from torch import nn

from dsv3ref.kernels.gemm import contiguous_layout
from dsv3ref.swap import current

CPU_BLOCK_ROWS = 2048  # assignments per run on a CPU (StackedExperts.block_rows)


def grouped_mm_supported(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> bool:
    """Whether torch's grouped_mm takes `dtype` on a device of this type: float32, bf16 and fp16 on
    the CPU; bf16 only on CUDA (SM80+, as torch's CUDA kernel checks); nothing in float64."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device_type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device_type == "cuda":
        return dtype == torch.bfloat16 and capability is not None and capability >= (8, 0)
    return False


def _can_use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    cuda = x.device.type == "cuda"
    return grouped_mm_supported(x.device.type, x.dtype, torch.cuda.get_device_capability(x.device) if cuda else None)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-group x @ w[g].T for consecutive row blocks of x.

    x (rows, in) sorted by group; w (groups, out, in); counts (groups,) rows of each group
    (summing to rows). Returns (rows, out). Falls back to one matmul per non-empty group where
    grouped_mm is not available (float64, older torch, other devices). Inside
    `dsv3ref.kernels.use(grouped_gemm=fn)`, fn computes it in DeepGEMM's contiguous layout instead
    (`m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)`: each group's rows padded to 128).
    """
    if current().grouped_gemm is not None:
        m_indices, rows = contiguous_layout(counts.tolist())
        a = x.new_zeros(len(m_indices), x.shape[1])  # (M_sum, in), padding rows zero
        a[rows.to(x.device)] = x
        d = x.new_empty(len(m_indices), w.shape[1])
        current().grouped_gemm(a, w, d, m_indices.to(x.device))
        return d[rows.to(x.device)]
    if _can_use_grouped_mm(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return F.grouped_mm(x, w.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    # unbind, not w[g]: autograd then stacks the groups' weight gradients once, where an index per group
    # would give each group a zero-filled gradient of the whole stack
    per_group = w.unbind(0)
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            out[start:start + n] = x[start:start + n] @ per_group[g].T  # (n, in) @ (in, out)
        start += n
    return out


class StackedExperts(nn.Module):
    """All routed experts of one MoE layer, as stacked weights (see the module docstring)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, first_expert: int = 0):
        super().__init__()
        self.n_experts, self.inter_dim = n_experts, inter_dim
        self.first_expert = first_expert
        """The checkpoint number of expert 0 here (non-zero when a parallel plan keeps a slice of the experts)."""
        self.block_rows: int | None = None
        """Assignments are processed in runs of whole experts of about this many rows. None: 2,048 on a
        CPU, where it keeps a long prefill's intermediates cache-sized (measured in benchmarks/moe.py),
        and one run of all assignments on other devices (a GPU: one grouped GEMM per projection, and in
        bf16, where torch's grouped_mm runs, no host synchronization; the memory planner counts all of a
        prefill chunk's intermediates)."""
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.register_state_dict_post_hook(_split_state_dict)
        self.register_load_state_dict_pre_hook(_stack_state_dict)

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """tokens (n, dim), gate values weights (n, k), expert ids (n, k) -> sum_k weight * expert(token), (n, dim)."""
        n, k = ids.shape
        if torch.compiler.is_compiling():  # one graph, whatever the routing
            if 2 * n * k <= self.n_experts:
                return self.gathered(tokens, weights, ids)  # few assignments: read just the chosen experts
            if tokens.device.type == "cpu":
                # The grouped computation as one opaque operator of the graph (its output is (n, dim)
                # whatever the routing, so the graph stays whole): each expert read once, on its tokens only.
                return grouped_experts(tokens, weights, ids, self.gate_up_proj, self.down_proj,
                                       self.rows_per_run(tokens.device))
            if n * k <= self.n_experts:  # (CUDA graphs cannot capture its host synchronization)
                return self.dense(tokens, weights, ids)  # most experts in use: read each one once
        return self.grouped(tokens, weights, ids)

    def dense(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum, static shapes again: every token through every expert, each expert's weights
        read once, the unchosen ones weighted by zero. For torch.compile when a batch's tokens use
        most experts anyway (gathering would then copy some experts several times)."""
        gates = torch.zeros(ids.shape[0], self.n_experts, dtype=tokens.dtype, device=tokens.device)
        gates = gates.scatter(1, ids, weights.to(tokens.dtype))  # (n, e), zero where not chosen
        e, f, c = self.gate_up_proj.shape
        # (n, c) @ (e f, c).T: the stacked weights read in place, as one matrix (no transposed copy)
        gate, up = F.linear(tokens, self.gate_up_proj.reshape(e * f, c)).unflatten(-1, (e, f)).split(
            self.inter_dim, dim=-1)
        h = F.silu(gate) * up * gates[..., None]  # (n, e, inter)
        # per expert (n, inter) @ (inter, c), on strided views of h and down_proj; summed over experts
        return torch.bmm(h.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0)  # (n, c)

    @torch.compiler.disable  # sizes that depend on the routing: always eager, between compiled parts
    def grouped(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The sorted, blocked grouped-GEMM computation described in the module docstring."""
        return _grouped(tokens, weights, ids, self.gate_up_proj, self.down_proj, self.rows_per_run(tokens.device))

    def rows_per_run(self, device: torch.device) -> int | None:
        """`block_rows` as it applies on `device` (None: one run of all assignments)."""
        return self.block_rows if self.block_rows is not None else default_block_rows(device.type)

    def gathered(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum with shapes that do not depend on the routing, for torch.compile (the sorted
        blocks above have data-dependent sizes, and torch's CPU grouped_mm has no kernel for the
        compiler's shape propagation). Each (token, slot) gathers its expert's weights: at decode,
        exactly the k experts a token reads. Used under compile while tokens * k <= experts (decode);
        a longer input (prefill) keeps the grouped path, outside the graph, since gathering would copy
        k experts' weights per token. Same arguments and result as `forward`."""
        gate_up = self.gate_up_proj[ids]  # (n, k, 2 * inter, dim)
        gate, up = einsum(tokens, gate_up, "n c, n k f c -> n k f").split(self.inter_dim, dim=-1)
        h = F.silu(gate) * up * weights[..., None].to(tokens.dtype)  # (n, k, inter)
        return einsum(h, self.down_proj[ids], "n k i, n k c i -> n c")



def default_block_rows(device_type: str) -> int | None:
    """Assignments per run where StackedExperts.block_rows is None: CPU_BLOCK_ROWS on a CPU, one run
    (None) on any other device."""
    return CPU_BLOCK_ROWS if device_type == "cpu" else None


def _grouped(tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up_proj: torch.Tensor,
             down_proj: torch.Tensor, block_rows: int | None) -> torch.Tensor:
    """StackedExperts.grouped on explicit weights: gate_up_proj (e, 2 * inter, c), down_proj (e, c, inter);
    runs of about block_rows assignments, or one run (None)."""
    n, k = ids.shape
    if n * k == 0:
        return tokens.new_zeros(n, tokens.shape[1])  # no assignments
    experts = gate_up_proj.shape[0]
    flat = ids.reshape(-1)  # (n*k,) the expert of each assignment
    sorted_ids, order = torch.sort(flat, stable=True)  # assignments grouped by expert
    # (experts,) rows per expert, from where each expert's rows end in the sorted ids (bincount would
    # wait for the device to learn its output's size)
    ends = torch.searchsorted(sorted_ids, torch.arange(1, experts + 1, device=flat.device))
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    gate_values = weights.reshape(-1)[order, None].to(tokens.dtype)  # (n*k, 1)
    training = torch.is_grad_enabled() and (gate_up_proj.requires_grad or down_proj.requires_grad)
    # Training keeps every run's activations for the backward pass anyway, and each run's slice of a
    # stacked weight would get a zero-filled gradient of the whole stack (autograd's slice backward):
    # it takes one run of all experts, the weights whole (their gradients come out whole).
    if block_rows is None or training:
        spans = [(0, experts, 0, n * k)]
    else:
        spans = _blocks(counts.tolist(), block_rows)
    unsorted = None
    for e0, e1, r0, r1 in spans:
        rows = order[r0:r1]
        whole = (e0, e1) == (0, experts)
        gate_up_w, down_w = (gate_up_proj, down_proj) if whole else (gate_up_proj[e0:e1], down_proj[e0:e1])
        h = _hidden(tokens[rows // k], gate_up_w, counts[e0:e1], gate_values[r0:r1])  # (rows, inter)
        if unsorted is None:  # made after the first run's hidden layer, which then holds less memory at once
            unsorted = tokens.new_empty(n * k, tokens.shape[1])  # each assignment's output, (token, slot) order
        unsorted[rows] = grouped_linear(h, down_w, counts[e0:e1])  # (rows, dim)
    if k == 1:
        return unsorted  # one slot per token (a parallel plan's local assignments): nothing to add
    # Each token's k contributions are added in a fixed order, so the result is deterministic on
    # every device (unlike an atomic scatter-add on a GPU).
    return reduce(unsorted, "(n k) c -> n c", "sum", k=k)


def _hidden(x: torch.Tensor, gate_up_proj: torch.Tensor, counts: torch.Tensor, gate_values: torch.Tensor
            ) -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) * g for assignment rows x (rows, dim) sorted by expert, their gate
    values g (rows, 1) -> (rows, inter). The gate value scales the expert's output; applied before
    down_proj (linear), it touches inter numbers per row instead of dim. A function of its own so that x
    and the gate and up projections are freed (in inference) before down_proj runs."""
    gate, up = grouped_linear(x, gate_up_proj, counts).chunk(2, dim=-1)
    return F.silu(gate) * up * gate_values


def _blocks(counts: list[int], block_rows: int):
    """Cut the experts into consecutive runs holding at least block_rows assignments each (an
    expert is never split); yields (first expert, end expert, first row, end row)."""
    e0 = r0 = rows = 0
    for e, c in enumerate(counts):
        rows += c
        if rows - r0 >= block_rows or e == len(counts) - 1:
            if rows > r0:
                yield e0, e + 1, r0, rows
            e0, r0 = e + 1, rows


@torch.library.custom_op("dsv3ref::grouped_experts", mutates_args=())
def grouped_experts(tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor, block_rows: int | None) -> torch.Tensor:
    """`_grouped` registered as a torch operator (`torch.ops.dsv3ref.grouped_experts`), so that
    torch.compile keeps it in one graph as a call, instead of tracing its routing-dependent sizes."""
    return _grouped(tokens, weights, ids, gate_up_proj, down_proj, block_rows)


@grouped_experts.register_fake
def _(tokens, weights, ids, gate_up_proj, down_proj, block_rows):
    return torch.empty_like(tokens)  # (n, dim), whatever the routing

def _split_state_dict(module: StackedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """Replace the stacked tensors by per-expert views named as in the checkpoint."""
    gate_up = state_dict.pop(prefix + "gate_up_proj")
    down = state_dict.pop(prefix + "down_proj")
    i, first = module.inter_dim, module.first_expert
    for e in range(module.n_experts):
        state_dict[f"{prefix}{first + e}.gate_proj.weight"] = gate_up[e, :i]
        state_dict[f"{prefix}{first + e}.up_proj.weight"] = gate_up[e, i:]
        state_dict[f"{prefix}{first + e}.down_proj.weight"] = down[e]


def _stack_state_dict(module: StackedExperts, state_dict: dict, prefix: str, *args) -> None:
    """Inverse of _split_state_dict, for load_state_dict: stack per-expert tensors if present."""
    if f"{prefix}{module.first_expert}.gate_proj.weight" not in state_dict:
        return  # let load_state_dict report the missing keys

    def take(e: int, name: str) -> torch.Tensor:
        return state_dict.pop(f"{prefix}{module.first_expert + e}.{name}.weight")

    n = module.n_experts
    state_dict[prefix + "gate_up_proj"] = torch.stack(
        [torch.cat([take(e, "gate_proj"), take(e, "up_proj")]) for e in range(n)])
    state_dict[prefix + "down_proj"] = torch.stack([take(e, "down_proj") for e in range(n)])
