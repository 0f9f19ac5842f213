"""Bridges between a dense ``transformers`` model and a weight-sparse SparseGPT (SPEC §7).

Per paired residual site an encoder (dense -> sparse, Linear + AbsTopK) and a
decoder (sparse -> dense, Linear), trained with normalised MSE, two hybrid
KL terms and the sparse model's own loss; then circuit channels of the sparse
model can be moved and the change carried into the dense model.

    from bridges import BridgedPair, load_bridge
    from bridges.intervene import intervene
    pair = BridgedPair(sparse, dense)                  # sites through sites_of(...) only
    out = pair(input_ids, labels=input_ids)            # .loss (weighted), .components
    pair.hybrid_logits(input_ids, "d2s", i)            # dense to site i, then the sparse model

Modules: ``bridge`` (pairing, maps, losses, the pair, the quality gate),
``models`` (loading, incl. GGUF dense models; tokenizer check), ``config``
(BridgeConfig, job "bridge"; modes joint / finetune / bridges), ``train`` (the
job, ``load_bridge``), ``intervene`` (the intervention experiment; its CLI is
``sparse_lm_app/commands/intervene.py``).
"""

from bridges.bridge import (BridgedPair, BridgeError, BridgeOutput, Bridges, SitePair, evaluate_bridges,
                            kl_dense_hybrid, nmse, pair_sites, proportional_pairing, quality_gate)
from bridges.config import BridgeConfig, BridgeSection
from bridges.models import TokenizerMismatchError, check_same_tokenizer

__all__ = [
    "BridgeConfig", "BridgeError", "BridgeOutput", "BridgeSection", "BridgedPair", "Bridges", "SitePair",
    "TokenizerMismatchError", "check_same_tokenizer", "evaluate_bridges", "kl_dense_hybrid", "load_bridge",
    "nmse", "pair_sites", "proportional_pairing", "quality_gate",
]


def __getattr__(name: str):
    # The job module imports the trainer (DeepSpeed): only when asked for.
    if name == "load_bridge":
        from bridges.train import load_bridge

        return load_bridge
    raise AttributeError(f"module 'bridges' has no attribute {name!r}")
