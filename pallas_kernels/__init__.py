"""GPU kernels with one public entry point each, and their JAX references."""

from pallas_kernels.sparse_attention import BACKENDS
from pallas_kernels.sparse_attention import select_backends
from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.sparse_attention import sparse_attention_reference

__all__ = ["BACKENDS", "select_backends", "sparse_attention",
           "sparse_attention_reference"]
