"""sparse-lm: weight-sparse GPT transformers, circuit pruning and dense<->sparse bridges."""

from sparse_lm.model import SparseGPT, SparseGPTConfig, register_auto_classes
from sparse_lm.sites import Site, SiteRegistry, abs_topk

__all__ = ["SparseGPT", "SparseGPTConfig", "Site", "SiteRegistry", "abs_topk", "register_auto_classes"]
