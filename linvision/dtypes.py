"""The floating dtypes by name: the jobs' and benchmarks' ``--dtype`` / ``pipeline.dtype`` and accelerate's
mixed-precision names."""
from __future__ import annotations

from types import MappingProxyType

import torch

DTYPES = MappingProxyType({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16})
# accelerate's ``mixed_precision`` names ("no" keeps fp32)
MIXED_PRECISION_DTYPES = MappingProxyType({"fp16": torch.float16, "bf16": torch.bfloat16})

__all__ = ["DTYPES", "MIXED_PRECISION_DTYPES"]
