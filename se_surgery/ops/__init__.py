"""Fused SE kernels: one ``torch.library`` custom op per SE join (see :mod:`.fused`).

Triton (:mod:`.triton_kernels`) is imported only when a CUDA tensor reaches the op.
"""

from .fused import composite_backward, composite_forward, se_join

__all__ = ["composite_backward", "composite_forward", "se_join"]
