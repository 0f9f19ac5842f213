"""Configs of the training jobs (``pretrain``: sparse, ``train-dense``: GPT-2 baseline).

Both share the data, optimizer and training sections; they differ in the model
section and in whether weight sparsity is on. Presets live in ``configs/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparse_lm.config import field, section
from sparse_lm.sparsity import SparsityConfig


@dataclass
class DataSection:
    source: str = field("stdlib", "corpus: 'stdlib' (this interpreter's standard library), a folder, a glob, or hf:NAME[:CONFIG]")
    pattern: str = field("**/*.py", "file pattern inside a folder source")
    text_column: str = field("text", "text column of a datasets source")
    split: str = field("train", "split of a datasets source")
    max_documents: int | None = field(None, "keep only the first N documents (quick runs)")
    vocab_size: int = field(2048, "BPE vocabulary size")
    block_size: int = field(256, "tokens per training sequence")
    val_fraction: float = field(0.02, "share of files held out for validation")
    tokenizer: str | None = field(None, "existing tokenizer folder to use instead of training one")
    data_dir: str | None = field(None, "prepared data folder (from `sparse-lm data`); None: prepare inside the run")
    num_proc: int = field(2, "processes for tokenization")


@dataclass
class SparseModelSection:
    n_layer: int = field(8, "transformer blocks")
    d_model: int = field(256, "residual stream width")
    n_head: int = field(16, "attention heads")
    d_head: int = field(16, "width of each head")
    d_mlp: int = field(1024, "MLP hidden width")
    afrac: float | None = field(0.25, "AbsTopK kept fraction of activations (None: dense activations)")
    afrac_loctypes: list[str] = field(
        ["attn_in", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out"],
        "locations where AbsTopK acts (see sparse_lm.model.LOCTYPES)",
    )
    sink: bool = field(True, "learned per-head attention sink")
    bigram_table: bool = field(True, "dense learnable vocab x vocab logit table (excluded from sparsity)")
    bias: bool = field(True, "biases in the linear maps")
    activation_type: Literal["gelu", "relu"] = field("gelu", "MLP nonlinearity")
    tied_unembed: bool = field(False, "tie lm_head to the token embedding")


@dataclass
class DenseModelSection:
    n_layer: int = field(8, "GPT-2 blocks")
    n_embd: int = field(256, "residual stream width")
    n_head: int = field(8, "attention heads")
    n_inner: int | None = field(None, "MLP hidden width (None: 4 x n_embd)")


@dataclass
class OptimSection:
    lr: float = field(1e-2, "peak learning rate (paper: ~1e-2 at the 1x shape)")
    beta1: float = field(0.9, "Adam beta1")
    beta2: float = field(0.95, "Adam beta2")
    eps: float = field(0.1, "Adam eps (paper code: 0.1; the large value matters for sparse training)")
    weight_decay: float = field(0.1, "decoupled weight decay on the weight matrices")
    grad_rms_bound: float | None = field(1.0, "bound on the RMS of the whole gradient (None: no clipping)")
    warmup: float = field(0.01, "fraction of steps of linear warmup")
    schedule: Literal["sharkfin", "linear", "constant"] = field(
        "sharkfin", "sharkfin: warmup, linear decay, x sqrt(target/current L0); linear: the same without the L0 factor"
    )


@dataclass
class TrainSection:
    steps: int = field(1000, "optimizer steps")
    micro_batch: int = field(16, "sequences per rank per forward")
    global_batch: int = field(32, "sequences per optimizer step (= micro_batch x grad_accum x world size)")
    precision: Literal["fp32", "bf16", "bf16-autocast"] = field(
        "bf16-autocast", "fp32; bf16 (DeepSpeed bf16 weights, fp32 master); bf16-autocast (fp32 weights, bf16 matmuls)"
    )
    zero_stage: int = field(0, "DeepSpeed ZeRO stage (0, 1 or 2)")
    seed: int = field(0, "seed of initialisation and data order")
    eval_every: int = field(100, "steps between validation passes (0: only at the end)")
    eval_batches: int = field(8, "validation batches of micro_batch sequences per pass")
    log_every: int = field(10, "steps between metric lines")
    checkpoint_every: int = field(0, "steps between DeepSpeed checkpoints (0: only at the end)")
    keep_checkpoints: int = field(2, "newest checkpoints kept on disk")
    threads: int | None = field(None, "torch threads per rank (None: cores / ranks)")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"train.global_batch {self.global_batch} is not a multiple of train.micro_batch {self.micro_batch}"
            )


@dataclass
class PretrainConfig:
    run_name: str = field("sparse", "name of the run folder under out_dir")
    out_dir: str = field("runs", "parent folder of run folders")
    data: DataSection = section(DataSection, "corpus, tokenizer and packing")
    model: SparseModelSection = section(SparseModelSection, "SparseGPT shape and activation sparsity")
    sparsity: SparsityConfig = section(SparsityConfig, "weight sparsity")
    optim: OptimSection = section(OptimSection, "AdamW and learning-rate schedule")
    train: TrainSection = section(TrainSection, "steps, batches, precision, DeepSpeed")


@dataclass
class DenseConfig:
    run_name: str = field("dense", "name of the run folder under out_dir")
    out_dir: str = field("runs", "parent folder of run folders")
    data: DataSection = section(DataSection, "corpus, tokenizer and packing")
    model: DenseModelSection = section(DenseModelSection, "GPT-2 shape")
    optim: OptimSection = section(OptimSection, "AdamW and learning-rate schedule")
    train: TrainSection = section(TrainSection, "steps, batches, precision, DeepSpeed")


JOB_CONFIGS = {"pretrain": PretrainConfig, "dense": DenseConfig}
