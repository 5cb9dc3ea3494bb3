"""A hand-written LoRA layer: y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)."""
import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear and learns a low-rank update B @ A next to it.

    lora_A (r x in) starts kaiming-uniform and lora_B (out x r) starts at zero, so at
    step 0 the product B @ A is zero and the layer computes exactly what base does.
    The LoRA tensors are kept in fp32 even when the base model runs in bf16, so that
    AdamW's small updates are not rounded away.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.scaling = alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update that merge() adds to base.weight: (B @ A) * scaling, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:  # the update already lives inside base.weight
            return out
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return out + (update * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold B @ A into base.weight so inference costs one matmul (call unmerge() to undo)."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
