"""The ``prune`` job's config: which task, which nodes, the mask optimiser and the circuit search.

Resolved like every job config (`sparse_lm.config.resolve`): defaults, then a
preset (``sparse_lm/presets/prune-*.json``, ``"job": "prune"``), then ``key=value``
overrides. The resolved config is saved beside every circuit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sparse_lm.config import ConfigError, field

# The node sites of SPEC §5, per layer, in forward order.
DEFAULT_NODE_KINDS = [
    "attn.act_in",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.resid_delta",
    "mlp.act_in",
    "mlp.post_act",
    "mlp.resid_delta",
]


@dataclass
class PruneConfig:
    task: str = field("single_double_quote", "task name (see `sparse-lm eval-tasks --list`) or a .jsonl task file")
    method: Literal["learned", "attribution"] = field(
        "learned", "learned: Heaviside masks trained with a straight-through gradient; attribution: gradient x "
        "(activation - mean) scores (baseline)"
    )
    target_loss: float = field(0.15, "task loss (nats) the circuit must reach on the validation split (paper: 0.15)")
    min_accuracy: float = field(
        0.6, "the unpruned model's validation accuracy below which it counts as not solving the task and no circuit "
        "is searched (a model near chance, e.g. the random-weights control; 0: prune any model)"
    )
    relative_margin: float | None = field(
        None, "when set, the target is the unpruned model's own task loss on the validation split + this margin "
        "(overrides target_loss)"
    )
    node_sites: list[str] = field(
        DEFAULT_NODE_KINDS,
        "site kinds whose channels are nodes, for every layer ('attn.q'), or single sites ('2.mlp.post_act')",
    )
    # -- mask optimisation (learned) --
    steps: int = field(200, "Adam steps on the mask logits tau")
    batch_size: int = field(64, "task examples per step (a random minibatch of the train split)")
    lr: float = field(0.05, "Adam learning rate of tau")
    k_coef: float = field(
        3e-3, "loss weight of the number of open nodes (the sparsity pressure; too large and every node closes)"
    )
    collapse_retries: int = field(
        2, "when the masked task loss collapses toward chance (k_coef too strong for this model: every node "
        "closes at once), or the masks settle above the target (the circuit needs more than 2x + 10 the nodes they "
        "left open), train the masks again with k_coef / 3 and the next seed, up to this many times in all, keeping "
        "the smallest circuit (0: never; a sweep uses 0 so that CARBS sees what its k_coef does)"
    )
    weight_decay: float = field(0.0, "Adam (L2) weight decay of tau, pulling it toward 0")
    beta2: float = field(0.99, "Adam beta2 (beta1 is 0.9)")
    heaviside_temp: float = field(1.0, "temperature T of the surrogate gradient d/dtau sigmoid(tau / T)")
    init_value: float = field(0.1, "initial tau of every node (> 0: every node starts open)")
    init_noise: float = field(0.01, "standard deviation of the Gaussian noise added to the initial tau")
    precision: Literal["fp32", "bf16", "bf16-autocast"] = field(
        "bf16", "how the pruner's forward and backward passes compute: bf16 runs the model's linear layers in "
        "bfloat16 (weights cast once; AMX on recent CPUs) and everything else (attention, masks, margins, losses) "
        "in float32; bf16-autocast is torch.autocast (attention in bf16 too: slower on CPU); fp32 for exact float32"
    )
    # -- data --
    n_train: int = field(1024, "train-split examples (minibatches for the masks, calibration, attribution)")
    n_val: int = field(256, "validation-split examples (the bisection on the node count)")
    n_test: int = field(512, "test-split examples (every reported metric)")
    mean_blocks: int = field(64, "corpus blocks over which the mean activations (the ablation values) are taken")
    seed: int = field(0, "seed of tau's initial noise and the minibatch order")
    # -- the circuit --
    calibrate_steps: int = field(20, "LBFGS steps fitting the scale and shift of the logit difference (0: none)")
    faithfulness_points: int = field(
        12, "log-spaced node budgets of the faithfulness curves in circuit.json (test split; each costs one "
        "evaluation per node order; 0: no curves)"
    )
    snippets: int = field(5, "top-activating corpus snippets stored per circuit node (0: none)")
    snippet_tokens: int = field(40, "tokens per snippet, around the maximal position")
    max_listed_edges: int = field(100000, "edges listed in circuit.json (all are counted)")
    # -- machine --
    device: str = field("auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    chunk_tokens: int = field(4096, "padded tokens per forward pass (examples are grouped by length; memory/speed)")
    cache_dir: str | None = field(None, "folder of the mean-activation cache (None: <model>/.sparse_lm_cache)")

    def validate(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "n_train": self.n_train,
                    "n_val": self.n_val, "n_test": self.n_test, "mean_blocks": self.mean_blocks,
                    "chunk_tokens": self.chunk_tokens, "snippet_tokens": self.snippet_tokens}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.precision not in ("fp32", "bf16", "bf16-autocast"):
            raise ConfigError(f"precision must be 'fp32', 'bf16' or 'bf16-autocast', got {self.precision!r}")
        for key in ("calibrate_steps", "snippets", "max_listed_edges", "collapse_retries", "faithfulness_points"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not (self.target_loss > 0 and math.isfinite(self.target_loss)):
            raise ConfigError(f"target_loss must be a positive number of nats, got {self.target_loss}")
        if not 0 <= self.min_accuracy <= 1:
            raise ConfigError(f"min_accuracy must be in [0, 1], got {self.min_accuracy}")
        if self.relative_margin is not None and self.relative_margin < 0:
            raise ConfigError(f"relative_margin must be >= 0, got {self.relative_margin}")
        for key in ("lr", "heaviside_temp"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("k_coef", "weight_decay", "init_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"beta2 must be in [0, 1), got {self.beta2}")
        if not -1 <= self.init_value <= 1:
            raise ConfigError(f"init_value must be in [-1, 1] (tau is clamped there), got {self.init_value}")
        if not self.node_sites:
            raise ConfigError("node_sites is empty: name at least one site kind, e.g. mlp.post_act")


def parse_target(text: str) -> tuple[float | None, float | None]:
    """``"0.15"`` -> (0.15, None); ``"relative:+0.05"`` -> (None, 0.05) (the model's own loss + 0.05)."""
    text = str(text).strip()
    if text.startswith("relative:"):
        raw = text[len("relative:"):]
        try:
            margin = float(raw)
        except ValueError:
            raise ConfigError(f"target {text!r}: write relative:+MARGIN, e.g. relative:+0.05") from None
        return None, margin
    try:
        return float(text), None
    except ValueError:
        raise ConfigError(f"target {text!r} is not a number of nats (0.15) nor relative:+MARGIN") from None
