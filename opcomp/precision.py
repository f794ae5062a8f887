"""The working precision: what opcomp computes in and keeps its state in, per parameter dtype.

Half-precision parameters (bf16, fp16) are stepped in fp32 and rounded once; fp32 and fp64
parameters are stepped in their own precision, as torch.optim steps them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision parameters, the parameter's own dtype otherwise (fp64 stays fp64)."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def working(tensor: Tensor) -> Tensor:
    """The tensor itself when it is in its working precision (read-only use), else an upcast copy."""
    dtype = working_dtype(tensor.dtype)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
