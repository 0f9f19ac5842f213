"""One record per model architecture the toolkit reads: where its parts are and how to read them.

Everything that depends on a model's ``config.model_type`` is here, so adding
an architecture is one record (and a test that builds a tiny one):

- the module paths the site adapter hooks (`sparse_lm.adapters`),
- the weight map: a layer's matrices in ``(out, in)`` layout for circuit
  edges (`pruning.graph`),
- the fast head: the unembedding applied to the final residual at a few
  positions only (`pruning.forward`),
- which config attributes hold the context length and the number of layers.

Listed: SparseGPT, GPT-2, GPT-Neo, GPT-NeoX (Pythia), GPT-J, Phi-1/1.5/2, and the
pre-norm decoders with Llama's module names (Llama, Mistral, Qwen2, Qwen3, OLMo, Gemma,
Gemma 2, Gemma 3, Phi-3). Not listed, and refused with that message: blocks that
rescale or renormalise the residual sum itself (OPT-350m's post-norm, OLMo 2,
Granite's multipliers).

**Parallel blocks** (GPT-NeoX with ``use_parallel_residual``, which every Pythia
model sets; GPT-J; Phi-1/2): attention and MLP both read the block's input and their
outputs are added together. ``resid_mid`` is still the block's input plus the
attention's write, a sum the residual stream passes through on its way out, but the
MLP does not read it: ``mlp.act_in`` is the MLP's norm of ``resid_in``, and writing
``resid_mid`` changes what the next block reads, not what this MLP reads
(`is_parallel`). GPT-J and Phi give both branches one norm (``norm1 == norm2``,
`Arch.shared_norm`): the two ``act_in`` sites are then the inputs of the attention and
of the MLP, so writing one leaves the other branch alone.

SparseGPT (``sparse_gpt``) is listed too: it has its own named sites
(``native_sites``), but its weights, head, context and depth are read the
same way as any other model's.

    from sparse_lm.arch import arch_of, context_length, n_layers
    arch_of(model).weights(model, 0)     # LayerWeights of layer 0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

__all__ = ["Arch", "ARCHS", "LayerWeights", "arch_of", "context_length", "n_layers", "layer_weights", "is_parallel"]


@dataclass
class LayerWeights:
    """A layer's matrices in (out, in) layout, and how its q and k channels pair in the score."""

    q: torch.Tensor  # (d_q, d_model)
    k: torch.Tensor  # (d_k, d_model)
    v: torch.Tensor  # (d_v, d_model)
    o: torch.Tensor  # (d_model, d_q): one input column per query channel (d_q = d_v without GQA)
    fc: torch.Tensor  # (d_mlp, d_model); for a gated MLP: nonzero where gate or up is
    proj: torch.Tensor  # (d_model, d_mlp)
    attn_gain: torch.Tensor  # (d_model,) gain of the norm before attention (the attn.act_in read)
    mlp_gain: torch.Tensor  # (d_model,) gain of the norm before the MLP
    qk_pairs: tuple[torch.Tensor, torch.Tensor]  # (q channels, k channels) that multiply in the score
    # (d_q,) the v channel each input column of o reads; None: column j reads v channel j. Grouped-query
    # attention repeats each key/value head for its group of query heads, so o has d_q columns.
    o_reads_v: torch.Tensor | None = None


WeightMap = Callable[[nn.Module, int], LayerWeights]
# (model, final residual at some positions (n, d_model), the token ids at those positions (n,)) -> logits (n, V)
Head = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Arch:
    """How to find and read the parts of one architecture (paths are ``get_submodule`` paths)."""

    model_type: str
    blocks: str  # path of the ModuleList of blocks
    final_norm: str
    norm1: str  # inside a block
    attn: str
    norm2: str
    mlp: str
    post_act: tuple[str, str]  # (module inside the block, "output" of it or "input" to it)
    qkv: tuple[str, ...]  # one fused module (q, k, v stacked) or three modules
    weights: WeightMap  # a layer's matrices for circuit edges
    head: Head  # the unembedding of the final residual
    context_key: str  # config attribute: the longest sequence the model takes
    layers_key: str  # config attribute: the number of blocks
    # Modules inside a block whose outputs are added to the residual stream (the ``resid_delta`` sites):
    # the attention and the MLP themselves, or (Gemma 2 and 3) the norms applied to their outputs.
    attn_out: str = ""
    mlp_out: str = ""
    native_sites: bool = False  # the model names its own sites (``model.sites``); no hooks needed
    # (config) -> widths of q, k, v in a fused qkv module; None: three equal thirds (GPT-2, SparseGPT)
    qkv_widths: Callable[[object], list[int]] | None = None
    # (config) -> for each channel of q, k, v stacked in that order, its column in the fused module's output;
    # None: the output is already q, k, v stacked. GPT-NeoX interleaves them per head (q_h, k_h, v_h).
    qkv_order: Callable[[object], torch.Tensor] | None = None
    # (config) -> whether attention and MLP read the same block input (True) or one after the other;
    # None: always one after the other
    parallel: Callable[[object], bool] | None = None

    @property
    def shared_norm(self) -> bool:
        """One norm feeds both branches (GPT-J, Phi): the act_in sites hook the inputs of attn and mlp."""
        return self.norm1 == self.norm2


OPTIONAL_FIELDS = ("native_sites", "qkv_widths", "qkv_order", "parallel")


# ---------------------------------------------------------------------------- weight maps


def _same_dim_pairs(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(width)
    return idx, idx


def _gain(norm: nn.Module, d: int, offset: float = 0.0) -> torch.Tensor:
    """A norm's per-channel gain, (d,): its weight (plus `offset`: Gemma's norms scale by 1 + weight), or
    ones for a norm without a weight (OLMo)."""
    w = getattr(norm, "weight", None)
    return w.detach().float().cpu() + offset if w is not None else torch.ones(d)


def _w(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().float().cpu()


def _sparse_gpt_layer(model: nn.Module, i: int) -> LayerWeights:
    block = model.transformer.h[i]
    d_attn = block.attn.n_head * block.attn.d_head
    q, k, v = _w(block.attn.c_attn).split(d_attn, dim=0)  # Linear: (out, in)
    d = model.config.d_model
    return LayerWeights(q=q, k=k, v=v, o=_w(block.attn.c_proj), fc=_w(block.mlp.c_fc), proj=_w(block.mlp.c_proj),
                        attn_gain=_gain(block.ln_1, d), mlp_gain=_gain(block.ln_2, d), qk_pairs=_same_dim_pairs(d_attn))


def _gpt2_layer(model: nn.Module, i: int) -> LayerWeights:
    block = model.transformer.h[i]
    d = model.config.n_embd
    # Conv1D stores (in, out): transpose to (out, in).
    q, k, v = _w(block.attn.c_attn).t().split(d, dim=0)
    return LayerWeights(q=q, k=k, v=v, o=_w(block.attn.c_proj).t(), fc=_w(block.mlp.c_fc).t(),
                        proj=_w(block.mlp.c_proj).t(), attn_gain=_gain(block.ln_1, d), mlp_gain=_gain(block.ln_2, d),
                        qk_pairs=_same_dim_pairs(d))


def _gpt_neo_layer(model: nn.Module, i: int) -> LayerWeights:
    block = model.transformer.h[i]
    att, d = block.attn.attention, model.config.hidden_size
    return LayerWeights(q=_w(att.q_proj), k=_w(att.k_proj), v=_w(att.v_proj), o=_w(att.out_proj),
                        fc=_w(block.mlp.c_fc), proj=_w(block.mlp.c_proj), attn_gain=_gain(block.ln_1, d),
                        mlp_gain=_gain(block.ln_2, d), qk_pairs=_same_dim_pairs(d))


@dataclass(frozen=True)
class _Decoder:
    """How a pre-norm decoder with Llama's module names stores a layer (``model.model.layers[i]``)."""

    fused_qkv: bool = False  # Phi-3: one qkv_proj, q then k then v rows
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, gate rows then up rows
    gain_offset: float = 0.0  # Gemma: norms scale by 1 + weight
    post_norms: bool = False  # Gemma 2/3: a norm on the attention and MLP outputs before the residual add


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _decoder_qkv_widths(cfg) -> list[int]:
    """Widths of q, k and v in a fused qkv projection (grouped-query attention: k and v are narrower)."""
    d_head = _head_dim(cfg)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return [cfg.num_attention_heads * d_head, kv_heads * d_head, kv_heads * d_head]


def _rotary_dim(cfg, d_head: int) -> int:
    """How many dimensions of a head the rotary embedding turns (a partial rotary factor leaves the rest)."""
    params = getattr(cfg, "rope_parameters", None)
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = getattr(cfg, "partial_rotary_factor", None) or 1.0
    return int(d_head * factor)


def _rotary_pairs(q_width: int, k_width: int, d_head: int, r: int,
                  every_two: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which key channels each query channel multiplies in the score, and the key/value channel of its head.

    Returns (q channels, k channels) of the pairs and, for every query channel, the channel of the same
    dimension in the key/value head it reads (grouped-query attention: ``q_width // k_width`` query heads
    share one). The rotary embedding mixes dimension e with e +- r/2 of the same head (``every_two``,
    GPT-J: with its neighbour e xor 1); r: the rotary dimensions, the others pass through, paired only
    with themselves.
    """
    group = q_width // k_width
    j = torch.arange(q_width)
    head, dim = j // d_head, j % d_head
    k_same = (head // group) * d_head + dim
    turned = dim < r
    partner = dim ^ 1 if every_two else (dim + r // 2) % max(r, 1)
    k_rot = (head // group) * d_head + torch.where(turned, partner, dim)
    return torch.cat([j, j[turned]]), torch.cat([k_same, k_rot[turned]]), k_same


def _decoder_layer(model: nn.Module, i: int, style: _Decoder) -> LayerWeights:
    block = model.model.layers[i]
    cfg = model.config
    att, mlp = block.self_attn, block.mlp
    d = cfg.hidden_size
    if style.fused_qkv:
        q, k, v = _w(att.qkv_proj).split(_decoder_qkv_widths(cfg), dim=0)
    else:
        q, k, v = _w(att.q_proj), _w(att.k_proj), _w(att.v_proj)
    if style.fused_gate_up:
        gate, up = _w(mlp.gate_up_proj).chunk(2, dim=0)
    else:
        gate, up = _w(mlp.gate_proj), _w(mlp.up_proj)
    o, proj = _w(att.o_proj), _w(mlp.down_proj)
    mlp_norm = block.post_attention_layernorm
    if style.post_norms:
        # The residual gets norm(o y): output channel c is o's row c times the norm's gain c (and one RMS
        # per position, which no weight entry carries); the MLP reads its own pre-norm.
        o = o * _gain(block.post_attention_layernorm, d, style.gain_offset)[:, None]
        proj = proj * _gain(block.post_feedforward_layernorm, d, style.gain_offset)[:, None]
        mlp_norm = block.pre_feedforward_layernorm
    d_head = _head_dim(cfg)
    q_ch, k_ch, k_same = _rotary_pairs(q.shape[0], k.shape[0], d_head, _rotary_dim(cfg, d_head))
    return LayerWeights(q=q, k=k, v=v, o=o, fc=torch.where(up != 0, up, gate), proj=proj,
                        attn_gain=_gain(block.input_layernorm, d, style.gain_offset),
                        mlp_gain=_gain(mlp_norm, d, style.gain_offset), qk_pairs=(q_ch, k_ch), o_reads_v=k_same)


def _llama_layer(model: nn.Module, i: int) -> LayerWeights:
    return _decoder_layer(model, i, _Decoder())


def _gemma_layer(model: nn.Module, i: int) -> LayerWeights:
    return _decoder_layer(model, i, _Decoder(gain_offset=1.0))


def _gemma2_layer(model: nn.Module, i: int) -> LayerWeights:
    return _decoder_layer(model, i, _Decoder(gain_offset=1.0, post_norms=True))


def _phi3_layer(model: nn.Module, i: int) -> LayerWeights:
    return _decoder_layer(model, i, _Decoder(fused_qkv=True, fused_gate_up=True))


def _neox_qkv_order(cfg) -> torch.Tensor:
    """GPT-NeoX's fused output, viewed as (heads, 3 * d_head), holds q_h, k_h, v_h of each head side by side."""
    d_head = cfg.hidden_size // cfg.num_attention_heads
    j = torch.arange(cfg.hidden_size)
    head, dim = j // d_head, j % d_head
    return torch.cat([head * 3 * d_head + part * d_head + dim for part in range(3)])


def _gpt_neox_layer(model: nn.Module, i: int) -> LayerWeights:
    block, cfg = model.gpt_neox.layers[i], model.config
    d = cfg.hidden_size
    q, k, v = _w(block.attention.query_key_value)[_neox_qkv_order(cfg)].split(d, dim=0)
    d_head = d // cfg.num_attention_heads
    q_ch, k_ch, _ = _rotary_pairs(d, d, d_head, _rotary_dim(cfg, d_head))
    return LayerWeights(q=q, k=k, v=v, o=_w(block.attention.dense), fc=_w(block.mlp.dense_h_to_4h),
                        proj=_w(block.mlp.dense_4h_to_h), attn_gain=_gain(block.input_layernorm, d),
                        mlp_gain=_gain(block.post_attention_layernorm, d), qk_pairs=(q_ch, k_ch))


def _gptj_layer(model: nn.Module, i: int) -> LayerWeights:
    block, cfg = model.transformer.h[i], model.config
    d = cfg.n_embd
    d_head = d // cfg.n_head
    q_ch, k_ch, _ = _rotary_pairs(d, d, d_head, cfg.rotary_dim or d_head, every_two=True)
    gain = _gain(block.ln_1, d)  # one norm feeds both branches
    return LayerWeights(q=_w(block.attn.q_proj), k=_w(block.attn.k_proj), v=_w(block.attn.v_proj),
                        o=_w(block.attn.out_proj), fc=_w(block.mlp.fc_in), proj=_w(block.mlp.fc_out), attn_gain=gain,
                        mlp_gain=gain, qk_pairs=(q_ch, k_ch))


def _phi_layer(model: nn.Module, i: int) -> LayerWeights:
    block, cfg = model.model.layers[i], model.config
    att, d = block.self_attn, cfg.hidden_size
    q, k = _w(att.q_proj), _w(att.k_proj)
    d_head = _head_dim(cfg)
    q_ch, k_ch, k_same = _rotary_pairs(q.shape[0], k.shape[0], d_head, _rotary_dim(cfg, d_head))
    gain = _gain(block.input_layernorm, d)  # one norm feeds both branches
    return LayerWeights(q=q, k=k, v=_w(att.v_proj), o=_w(att.dense), fc=_w(block.mlp.fc1), proj=_w(block.mlp.fc2),
                        attn_gain=gain, mlp_gain=gain, qk_pairs=(q_ch, k_ch), o_reads_v=k_same)


# ---------------------------------------------------------------------------- fast heads


def _head_sparse_gpt(model: nn.Module, x: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(model.transformer.ln_f(x)) + model.final_logits_bias
    if model.bigram_table is not None:
        logits = logits + model.bigram_table[last_ids].to(logits.dtype)
    return logits


def _head_gpt2(model: nn.Module, x: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.transformer.ln_f(x))


def _head_gpt_neox(model: nn.Module, x: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(model.gpt_neox.final_layer_norm(x))


def _head_phi(model: nn.Module, x: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.final_layernorm(x))


def _head_decoder(model: nn.Module, x: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(model.model.norm(x))
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 (and 3, when set)
    return logits if not cap else torch.tanh(logits / cap) * cap


# ---------------------------------------------------------------------------- the records


SPARSE_GPT = Arch(model_type="sparse_gpt", blocks="transformer.h", final_norm="transformer.ln_f", norm1="ln_1",
                  attn="attn", norm2="ln_2", mlp="mlp", post_act=("mlp.act", "output"), qkv=("attn.c_attn",),
                  weights=_sparse_gpt_layer, head=_head_sparse_gpt, context_key="block_size", layers_key="n_layer",
                  attn_out="attn", mlp_out="mlp", native_sites=True)
GPT2 = Arch(model_type="gpt2", blocks="transformer.h", final_norm="transformer.ln_f", norm1="ln_1", attn="attn",
            norm2="ln_2", mlp="mlp", post_act=("mlp.act", "output"), qkv=("attn.c_attn",), weights=_gpt2_layer,
            head=_head_gpt2, context_key="n_positions", layers_key="n_layer", attn_out="attn", mlp_out="mlp")
# GPT-Neo (and the TinyStories models, which are GPT-Neo): GPT-2's layout with Linear q/k/v inside attn.attention.
GPT_NEO = Arch(model_type="gpt_neo", blocks="transformer.h", final_norm="transformer.ln_f", norm1="ln_1", attn="attn",
               norm2="ln_2", mlp="mlp", post_act=("mlp.act", "output"),
               qkv=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"), weights=_gpt_neo_layer,
               head=_head_gpt2, context_key="max_position_embeddings", layers_key="num_layers", attn_out="attn",
               mlp_out="mlp")
LLAMA = Arch(model_type="llama", blocks="model.layers", final_norm="model.norm", norm1="input_layernorm",
             attn="self_attn", norm2="post_attention_layernorm", mlp="mlp", post_act=("mlp.down_proj", "input"),
             qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), weights=_llama_layer,
             head=_head_decoder, context_key="max_position_embeddings", layers_key="num_hidden_layers",
             attn_out="self_attn", mlp_out="mlp")
# Same module layout as Llama (Qwen3 adds per-head q/k norms after the projections: the q/k sites and the
# rotary pairing are unchanged; OLMo's norms have no weight: gains of 1).
MISTRAL = replace(LLAMA, model_type="mistral")
QWEN2 = replace(LLAMA, model_type="qwen2")
QWEN3 = replace(LLAMA, model_type="qwen3")
OLMO = replace(LLAMA, model_type="olmo")
# Gemma: Llama's layout, norms scaling by 1 + weight, embeddings scaled by sqrt(d) before block 0 (resid_in sees them).
GEMMA = replace(LLAMA, model_type="gemma", weights=_gemma_layer)
# Gemma 2 and 3: a norm on the attention output and one on the MLP output before each residual add (those
# outputs are the resid_delta sites), the MLP reading its own pre-norm; Gemma 2 soft-caps the logits.
GEMMA2 = replace(GEMMA, model_type="gemma2", norm2="pre_feedforward_layernorm", attn_out="post_attention_layernorm",
                 mlp_out="post_feedforward_layernorm", weights=_gemma2_layer)
GEMMA3 = replace(GEMMA2, model_type="gemma3_text")
# Phi-3: one fused qkv projection (grouped-query widths) and one fused gate/up projection.
PHI3 = replace(LLAMA, model_type="phi3", qkv=("self_attn.qkv_proj",), weights=_phi3_layer, qkv_widths=_decoder_qkv_widths)
# GPT-NeoX (every Pythia model): q, k, v fused and interleaved per head, LayerNorms with biases, a partial rotary
# embedding, and (use_parallel_residual) attention and MLP reading the same block input.
GPT_NEOX = Arch(model_type="gpt_neox", blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
                norm1="input_layernorm", attn="attention", norm2="post_attention_layernorm", mlp="mlp",
                post_act=("mlp.dense_4h_to_h", "input"), qkv=("attention.query_key_value",), weights=_gpt_neox_layer,
                head=_head_gpt_neox, context_key="max_position_embeddings", layers_key="num_hidden_layers",
                attn_out="attention", mlp_out="mlp", qkv_order=_neox_qkv_order,
                parallel=lambda cfg: bool(cfg.use_parallel_residual))
# GPT-J: parallel blocks with one LayerNorm for both branches, q/k/v/out without bias, the rotary embedding on
# the first rotary_dim dimensions of each head in neighbouring pairs.
GPTJ = Arch(model_type="gptj", blocks="transformer.h", final_norm="transformer.ln_f", norm1="ln_1", attn="attn",
            norm2="ln_1", mlp="mlp", post_act=("mlp.fc_out", "input"),
            qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"), weights=_gptj_layer, head=_head_gpt2,
            context_key="n_positions", layers_key="n_layer", attn_out="attn", mlp_out="mlp",
            parallel=lambda cfg: True)
# Phi-1, 1.5 and 2: GPT-J's block (one LayerNorm, parallel branches) with Llama's paths, a partial rotary
# embedding (rotate-half) and a final LayerNorm named final_layernorm.
PHI = Arch(model_type="phi", blocks="model.layers", final_norm="model.final_layernorm", norm1="input_layernorm",
           attn="self_attn", norm2="input_layernorm", mlp="mlp", post_act=("mlp.fc2", "input"),
           qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), weights=_phi_layer, head=_head_phi,
           context_key="max_position_embeddings", layers_key="num_hidden_layers", attn_out="self_attn",
           mlp_out="mlp", parallel=lambda cfg: True)
# A tracr-compiled transformer (`pruning.groundtruth.torch_model`) copies SparseGPT's module layout and site
# names (identity norms without a gain: gains of 1), so SparseGPT's weight map and head read it unchanged.
TRACR = replace(SPARSE_GPT, model_type="tracr")

ARCHS: dict[str, Arch] = {a.model_type: a for a in (SPARSE_GPT, GPT2, GPT_NEO, GPT_NEOX, GPTJ, PHI, LLAMA, MISTRAL,
                                                    QWEN2, QWEN3, OLMO, GEMMA, GEMMA2, GEMMA3, PHI3, TRACR)}


def arch_of(model: nn.Module) -> Arch:
    """The record of a model's architecture (by ``config.model_type``); a clear error for an unlisted one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))} "
                         f"(add a record to sparse_lm/arch.py)")
    return ARCHS[model_type]


def context_length(model: nn.Module) -> int:
    """The longest sequence the model takes (tokens)."""
    return int(getattr(model.config, arch_of(model).context_key))


def n_layers(model: nn.Module) -> int:
    """The number of blocks."""
    return int(getattr(model.config, arch_of(model).layers_key))


def is_parallel(model: nn.Module) -> bool:
    """Whether the model's blocks feed attention and MLP the same input (the MLP does not read ``resid_mid``)."""
    parallel = arch_of(model).parallel
    return bool(parallel is not None and parallel(model.config))


def layer_weights(model: nn.Module, layer: int) -> LayerWeights:
    """The matrices of one layer in (out, in) layout, whatever the architecture."""
    return arch_of(model).weights(model, layer)


def missing_fields(arch: Arch) -> list[str]:
    """Fields of a record left empty (a test keeps every record complete)."""
    return [f.name for f in fields(arch) if f.name not in OPTIONAL_FIELDS and getattr(arch, f.name) in (None, "", ())]
