"""sparse-lm: weight-sparse GPT transformers, circuit pruning and dense<->sparse bridges."""

import os

# Before torch starts its OpenMP runtime: busy-waiting worker threads made the many small
# ops of AbsTopK up to 8x slower whenever another process held a core (measured: 124 ms vs
# 13.5 ms per selection on 2 threads). Set the variable yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sparse_lm.model import SparseGPT, SparseGPTConfig, register_auto_classes
from sparse_lm.sites import Site, SiteRegistry, abs_topk

__all__ = ["SparseGPT", "SparseGPTConfig", "Site", "SiteRegistry", "abs_topk", "register_auto_classes"]
