"""GPU attention kernels with one public entry point each."""

from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.sparse_attention import sparse_attention_reference

__all__ = ["sparse_attention", "sparse_attention_reference"]
