"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), computed in at least float32."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalization over the last axis (no centering, no bias).

    Shapes: (..., dim) -> (..., dim). The statistics are taken in float32 (float64 for float64 input)
    and the normalized value is cast back to the input dtype before the weight multiplies it, as the
    released inference code and Hugging Face do, so bf16 runs round at the same place.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == compute == self.weight.dtype and x.device.type == "cpu":  # float32 or float64 throughout:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # torch's fused op does the lines below
        # (bit for bit, tested on the CPU; on a GPU its kernel reduces in another order, so it is not used)
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
