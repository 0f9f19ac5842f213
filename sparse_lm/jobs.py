"""Configs of the training jobs (``pretrain``: sparse, ``train-dense``: GPT-2 baseline).

Both share the data, optimizer and training sections; they differ in the model
section and in whether weight sparsity is on. Presets live in ``sparse_lm/presets/``.

The model sections are the model configs' own schema: every key of
:class:`SparseModelSection` is a keyword of :class:`~sparse_lm.model.SparseGPTConfig`
with the same default (and :class:`DenseModelSection` one of ``GPT2Config``), so
:func:`sparse_model_config` / :func:`dense_model_config` pass the section through
instead of copying it field by field. A unit test holds the names and defaults equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparse_lm.config import field, section, to_dict
from sparse_lm.sparsity import SparsityConfig


def _at_least(low: int, section: str, **values) -> None:
    for key, value in values.items():
        if value < low:
            raise ValueError(f"{section}.{key} must be at least {low}, got {value}")


def _finite_positive(section: str, **values) -> None:
    import math

    for key, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{section}.{key} must be a finite number > 0, got {value}")


@dataclass
class DataSection:
    source: str = field("stdlib", "corpus: 'stdlib' (this interpreter's standard library), 'python-site' (that plus "
                                  "the installed site-packages), a folder, a glob, or hf:NAME[:CONFIG]")
    pattern: str = field("**/*.py", "file pattern inside a folder source")
    text_column: str = field("text", "text column of a datasets source")
    split: str = field("train", "split of a datasets source")
    max_documents: int | None = field(None, "keep only the first N documents (quick runs)")
    vocab_size: int = field(2048, "BPE vocabulary size")
    pretokenizer: Literal["tinypython", "gpt2"] = field(
        "tinypython", "split before BPE: 'tinypython' (the paper's tokenizer: punctuation keeps its newline, "
                      "`]\\n`, `.add`) or 'gpt2' (byte-level BPE's own)")
    block_size: int = field(256, "tokens per training sequence")
    val_fraction: float = field(0.02, "share of files held out for validation")
    tokenizer: str | None = field(None, "existing tokenizer folder to use instead of training one")
    data_dir: str | None = field(None, "prepared data folder (from `sparse-lm data`); None: prepare inside the run")
    num_proc: int = field(2, "processes for tokenization")

    def validate(self) -> None:
        _at_least(2, "data", block_size=self.block_size, vocab_size=self.vocab_size)
        _at_least(1, "data", num_proc=self.num_proc)
        if self.max_documents is not None:
            _at_least(1, "data", max_documents=self.max_documents)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")


@dataclass
class SparseModelSection:
    """Every SparseGPTConfig keyword that shapes the forward pass (vocab_size comes from the tokenizer)."""

    n_layer: int = field(8, "transformer blocks")
    d_model: int = field(256, "residual stream width")
    n_head: int = field(16, "attention heads")
    d_head: int = field(16, "width of each head")
    d_mlp: int = field(1024, "MLP hidden width")
    block_size: int | None = field(None, "positions the model can read (None: max(data.block_size, 1024))")
    afrac: float | None = field(0.25, "AbsTopK kept fraction of activations (None: dense activations)")
    afrac_loctypes: list[str] = field(
        ["attn_in", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out"],
        "locations where AbsTopK acts (see sparse_lm.model.LOCTYPES)",
    )
    sink: bool = field(True, "learned per-head attention sink")
    enable_bigram_table: bool = field(True, "dense vocab x vocab logit table (excluded from sparsity)")
    learnable_bigram_table: bool = field(True, "the bigram table trains (false: a fixed table)")
    bias: bool = field(True, "biases in the linear maps")
    ln_bias: bool = field(False, "bias of the LayerNorms (only with rms_norm false)")
    rms_norm: bool = field(True, "RMSNorm (false: LayerNorm)")
    activation_type: Literal["gelu", "relu"] = field("gelu", "MLP nonlinearity")
    residual_activation_type: Literal["identity", "relu"] = field("identity", "nonlinearity on the residual stream")
    tied_unembed: bool = field(False, "tie lm_head to the token embedding")

    # Keys of saved run configs written before the section took SparseGPTConfig's names.
    RENAMED = {"bigram_table": "enable_bigram_table"}


@dataclass
class DenseModelSection:
    """GPT2Config keywords of the dense baseline (dropout is always 0; vocab_size comes from the tokenizer)."""

    n_layer: int = field(8, "GPT-2 blocks")
    n_embd: int = field(256, "residual stream width")
    n_head: int = field(8, "attention heads")
    n_inner: int | None = field(None, "MLP hidden width (None: 4 x n_embd)")
    n_positions: int | None = field(None, "positions the model can read (None: max(data.block_size, 1024))")
    activation_function: str = field("gelu_new", "MLP nonlinearity (a transformers ACT2FN name)")
    layer_norm_epsilon: float = field(1e-5, "LayerNorm epsilon")
    tie_word_embeddings: bool = field(False, "tie lm_head to the token embedding")


@dataclass
class OptimSection:
    lr: float = field(1e-2, "peak learning rate (paper: ~1e-2 at the 1x shape)")
    beta1: float = field(0.9, "Adam beta1")
    beta2: float = field(0.95, "Adam beta2")
    eps: float = field(0.1, "Adam eps (paper code: 0.1; the large value matters for sparse training)")
    weight_decay: float = field(0.1, "decoupled weight decay on the weight matrices")
    grad_rms_bound: float | None = field(1.0, "RMS the whole gradient is held to (see grad_rms_mode; None: no bound)")
    grad_rms_mode: Literal["normalize", "clip", "none"] = field(
        "clip", "normalize: rescale the whole gradient to RMS grad_rms_bound before every step (paper code); "
        "clip: only scale it down when its RMS exceeds the bound; none: leave it"
    )
    warmup: float = field(0.01, "fraction of steps of linear warmup")
    schedule: Literal["sharkfin", "linear", "constant"] = field(
        "sharkfin", "sharkfin: warmup, linear decay, x 1/sqrt(current L0) (paper: 1 at the dense start, so lr is the "
        "dense-start lr); linear: the same without the L0 factor"
    )

    def validate(self) -> None:
        _finite_positive("optim", lr=self.lr, eps=self.eps)
        if self.grad_rms_bound is not None:
            _finite_positive("optim", grad_rms_bound=self.grad_rms_bound)
        for key, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"optim.{key} must be in [0, 1), got {value}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"optim.warmup is a fraction of the steps in [0, 1], got {self.warmup}")


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
    snapshot_every: int = field(0, "steps between exported model snapshots, kept in snapshots/step<N>/ (0: none); "
                                   "the main job's dense baseline keeps them so circuits compare at equal "
                                   "pretraining loss")
    threads: int | None = field(None, "torch threads per rank (None: cores / ranks)")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        # A non-positive count would train nothing (and still write a model) or divide by zero later.
        _at_least(1, "train", steps=self.steps, micro_batch=self.micro_batch, global_batch=self.global_batch,
                  log_every=self.log_every, eval_batches=self.eval_batches, keep_checkpoints=self.keep_checkpoints)
        _at_least(0, "train", eval_every=self.eval_every, checkpoint_every=self.checkpoint_every)
        if self.threads is not None:
            _at_least(1, "train", threads=self.threads)
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


# ---------------------------------------------------------------------------
# model configs built from a job config (pretrain, train-dense, bridge mode a)


def _special_tokens(tokenizer) -> dict[str, int]:
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}


def sparse_model_config(cfg, vocab_size: int, tokenizer=None):
    """The SparseGPTConfig of a job config with a ``model`` :class:`SparseModelSection` (pretrain, bridge)."""
    from sparse_lm.model import SparseGPTConfig

    arch = to_dict(cfg.model)
    if arch["block_size"] is None:
        arch["block_size"] = max(cfg.data.block_size, 1024)
    return SparseGPTConfig(vocab_size=vocab_size, **arch, **_special_tokens(tokenizer))


def dense_model_config(cfg: DenseConfig, vocab_size: int, tokenizer=None):
    """The GPT2Config of a ``train-dense`` job config."""
    from transformers import GPT2Config

    arch = to_dict(cfg.model)
    if arch["n_positions"] is None:
        arch["n_positions"] = max(cfg.data.block_size, 1024)
    return GPT2Config(vocab_size=vocab_size, **arch, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      **_special_tokens(tokenizer))


def build_model(cfg: PretrainConfig | DenseConfig, job: str, vocab_size: int, tokenizer=None):
    """A freshly initialised model of a ``pretrain`` (SparseGPT) or ``dense`` (GPT2LMHeadModel) job config."""
    if job == "pretrain":
        from sparse_lm.model import SparseGPT

        return SparseGPT(sparse_model_config(cfg, vocab_size, tokenizer))
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(dense_model_config(cfg, vocab_size, tokenizer))
