"""SparseGPT: a GPT-2-style transformer built for weight and activation sparsity.

Read top to bottom: config, norm, attention, MLP, block, model. The layout is
pre-norm GPT-2 with RMSNorm, optional attention sink and bigram table, and a
named :class:`~sparse_lm.sites.Site` at every activation the method touches.
Module and parameter names follow the paper's released checkpoints
(``transformer.h.3.attn.c_attn.weight``...), so import/export is a rename of
one key, not a conversion.

Weight sparsity is not in this file: :mod:`sparse_lm.sparsity` projects the
matrices listed by :meth:`SparseGPT.weight_matrices` after each optimizer step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from sparse_lm.sites import Site, SiteRegistry

# Paper location types for AbsTopK (released ``afrac_loctypes``) and the site each one lives at.
LOCTYPE_TO_SITE = {
    "attn_in": "attn.act_in",
    "attn_q": "attn.q",
    "attn_k": "attn.k",
    "attn_v": "attn.v",
    "attn_out": "attn.resid_delta",
    "mlp_in": "mlp.act_in",
    "mlp_neuron": "mlp.post_act",
    "mlp_out": "mlp.resid_delta",
    "resid_post_attn": "resid_mid",
    "resid_post_mlp": "resid_in",  # of the next layer; "final_resid" after the last one
}
LOCTYPES = tuple(LOCTYPE_TO_SITE)


class GPTNames:
    """The names transformers' generic code (generate, pipelines) looks for, on a config that says
    d_model, n_layer and block_size."""

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def max_position_embeddings(self) -> int:
        return self.block_size


class SparseGPTConfig(GPTNames, PretrainedConfig):
    """Architecture of a SparseGPT; field names follow the released ``beeg_config.json``.

    The defaults are the paper's 1x shape, sink and bigram table included. A job
    config's ``model`` section (:class:`sparse_lm.jobs.SparseModelSection`) has
    exactly these keywords and defaults; change both together (a unit test checks).
    """

    model_type = "sparse_gpt"

    def __init__(
        self,
        vocab_size: int = 2048,
        block_size: int = 1024,
        n_layer: int = 8,
        n_head: int = 16,
        d_head: int = 16,
        d_model: int = 256,
        d_mlp: int = 1024,
        bias: bool = True,
        ln_bias: bool = False,
        rms_norm: bool = True,
        activation_type: str = "gelu",
        residual_activation_type: str = "identity",
        afrac: float | None = 0.25,
        afrac_loctypes: str = "attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out",
        sink: bool = True,
        enable_bigram_table: bool = True,
        learnable_bigram_table: bool = True,
        tied_unembed: bool = False,
        **kwargs,
    ):
        if isinstance(afrac_loctypes, (list, tuple)):
            afrac_loctypes = ",".join(afrac_loctypes)
        unknown = [t for t in afrac_loctypes.split(",") if t and t not in LOCTYPES]
        if unknown:
            raise ValueError(f"unknown afrac_loctypes {unknown}; choose from {', '.join(LOCTYPES)}")
        if activation_type not in ("gelu", "relu"):
            raise ValueError(f"activation_type {activation_type!r} is not 'gelu' or 'relu'")
        if residual_activation_type not in ("identity", "relu"):
            raise ValueError(f"residual_activation_type {residual_activation_type!r} is not 'identity' or 'relu'")
        if afrac is not None and not 0 < afrac <= 1:
            raise ValueError(f"afrac must be in (0, 1] or None (dense activations), got {afrac}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_head = d_head
        self.d_model = d_model
        self.d_mlp = d_mlp
        self.bias = bias
        self.ln_bias = ln_bias
        self.rms_norm = rms_norm
        self.activation_type = activation_type
        self.residual_activation_type = residual_activation_type
        self.afrac = afrac
        self.afrac_loctypes = afrac_loctypes
        self.sink = sink
        self.enable_bigram_table = enable_bigram_table
        self.learnable_bigram_table = learnable_bigram_table
        self.tied_unembed = tied_unembed
        kwargs.setdefault("tie_word_embeddings", tied_unembed)
        super().__init__(**kwargs)


    def topk(self, loctype: str, width: int) -> int | None:
        """AbsTopK k for a location type, or None when that location stays dense."""
        if self.afrac is None or loctype not in self.afrac_loctypes.split(","):
            return None
        return int(self.afrac * width)


class LayerNorm(nn.Module):
    """LayerNorm with optional bias (only for imported checkpoints with ``rms_norm: false``)."""

    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def make_norm(cfg: SparseGPTConfig) -> nn.Module:
    # RMSNorm keeps a zero in the residual meaningful (no mean subtraction), and
    # its gain can be folded into the next matrix without changing that matrix's L0.
    return nn.RMSNorm(cfg.d_model) if cfg.rms_norm else LayerNorm(cfg.d_model, cfg.ln_bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SparseGPTConfig, layer: int):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        d_attn = cfg.n_head * cfg.d_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * d_attn, bias=cfg.bias)  # q, k, v stacked
        self.c_proj = nn.Linear(d_attn, cfg.d_model, bias=cfg.bias)
        self.c_proj.scaled_init = True
        # A learned per-head logit for an always-visible slot with zero key and
        # value: lets a head put its attention "nowhere" (used as a threshold).
        self.sink_logit = nn.Parameter(torch.zeros(cfg.n_head)) if cfg.sink else None
        p = f"{layer}.attn."
        self.act_in = Site(p + "act_in", cfg.d_model, cfg.topk("attn_in", cfg.d_model))
        self.q = Site(p + "q", d_attn, cfg.topk("attn_q", d_attn))  # top-k over all heads together
        self.k = Site(p + "k", d_attn, cfg.topk("attn_k", d_attn))
        self.v = Site(p + "v", d_attn, cfg.topk("attn_v", d_attn))
        self.y = Site(p + "y", d_attn)
        self.resid_delta = Site(p + "resid_delta", cfg.d_model, cfg.topk("attn_out", cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = self.act_in(x)
        q, k, v = self.c_attn(x).split(self.n_head * self.d_head, dim=2)  # 3 x (B, T, nh*hs)
        q, k, v = self.q(q), self.k(k), self.v(v)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        y = self.attend(q, k, v)  # (B, nh, T, hs)
        y = self.y(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_head))  # (B, T, nh*hs)
        return self.resid_delta(self.c_proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention, with the sink when there is one: 3 x (B, nh, T, hs) -> (B, nh, T, hs)."""
        scale = 1.0 / math.sqrt(self.d_head)
        if self.sink_logit is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self._attend_with_sink(q, k, v, scale)

    def _attend_with_sink(self, q, k, v, scale):
        if q.device.type != "cpu" or not (torch.is_grad_enabled() and self.sink_logit.requires_grad):
            # GPUs; and on CPU a sink logit that takes no gradient (evaluation, a frozen model being
            # pruned): the mask then carries none, and SDPA takes its flash kernel with the mask (0.88-0.92x
            # the cost of the path below at the pruner's lengths, forward + backward).
            return self._attend_with_sink_sdpa(q, k, v, scale)
        # Training on CPU: with a mask that needs a gradient, SDPA takes its math path. Here the sink is one
        # more key, seen by every query through the plain causal flash kernel (no mask; 0.68x the cost of the
        # math path written out, forward + backward, 8 x 256 tokens, one thread): `is_causal` lets query t
        # see keys 0..t, so a zero query row goes first (its output is dropped) and query t+1 sees the sink
        # and keys 0..t.
        # The sink's logit is q1 . k1 * scale = sink_logit: q gets a constant 1 as an extra feature, the
        # sink key sink_logit / scale there and zeros elsewhere, the other keys 0 there; its value is zero.
        # v gets a zero feature too (flash needs q, k and v of one width). Computed in fp32, as the math
        # path upcasts.
        B, H, T, D = q.shape
        dtype = q.dtype
        work = torch.promote_types(dtype, torch.float32)  # float64 models stay float64
        sink = self.sink_logit.to(dtype).to(work)  # rounded as the SDPA path's mask is
        with torch.autocast("cpu", enabled=False):
            q1 = F.pad(q.to(work), (0, 1, 1, 0))  # (B, nh, 1+T, hs+1): row 0 and feature hs are zero
            q1[:, :, 1:, D] = 1.0
            k1 = F.pad(k.to(work), (0, 1, 1, 0))  # (B, nh, 1+T, hs+1): slot 0 is the sink
            k1[:, :, 0, D] = (sink / scale).view(1, H)
            v1 = F.pad(v.to(work), (0, 1, 1, 0))  # (B, nh, 1+T, hs+1): the sink's value is zero
            y = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, scale=scale)  # (B, nh, 1+T, hs+1)
        return y[:, :, 1:, :D].to(dtype)  # (B, nh, T, hs)

    def _attend_with_sink_sdpa(self, q, k, v, scale):
        B, H, T, D = q.shape
        zeros = q.new_zeros(B, H, 1, D)
        k = torch.cat([zeros, k], dim=2)  # (B, nh, 1+T, hs): slot 0 is the sink
        v = torch.cat([zeros, v], dim=2)
        allowed = torch.ones(T, T + 1, dtype=torch.bool, device=q.device)
        allowed[:, 1:] = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = torch.zeros(T, T + 1, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min).view(1, 1, T, T + 1)
        sink = torch.zeros(1, 1, 1, T + 1, dtype=q.dtype, device=q.device)
        sink[..., 0] = 1.0
        mask = mask + sink * self.sink_logit.to(q.dtype).view(1, H, 1, 1)  # (1, nh, T, 1+T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class MLP(nn.Module):
    def __init__(self, cfg: SparseGPTConfig, layer: int):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.act = nn.GELU() if cfg.activation_type == "gelu" else nn.ReLU()  # exact erf GELU
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.c_proj.scaled_init = True
        p = f"{layer}.mlp."
        self.act_in = Site(p + "act_in", cfg.d_model, cfg.topk("mlp_in", cfg.d_model))
        self.post_act = Site(p + "post_act", cfg.d_mlp, cfg.topk("mlp_neuron", cfg.d_mlp))
        self.resid_delta = Site(p + "resid_delta", cfg.d_model, cfg.topk("mlp_out", cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.post_act(self.act(self.c_fc(self.act_in(x))))  # (B, T, d_mlp)
        return self.resid_delta(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: SparseGPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg, layer)
        self.relu_resid = cfg.residual_activation_type == "relu"
        # The residual stream entering this block; for layer 0 it is the embedding output.
        # AbsTopK "resid_post_mlp" of the previous block acts here.
        k_in = cfg.topk("resid_post_mlp", cfg.d_model) if layer > 0 else None
        self.resid_in = Site(f"{layer}.resid_in", cfg.d_model, k_in)
        self.resid_mid = Site(f"{layer}.resid_mid", cfg.d_model, cfg.topk("resid_post_attn", cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resid_in(x)
        x = x + self.attn(self.ln_1(x))
        x = self.resid_mid(F.relu(x) if self.relu_resid else x)
        x = x + self.mlp(self.ln_2(x))
        return F.relu(x) if self.relu_resid else x


def _kept_positions(logits_to_keep: int | torch.Tensor, T: int) -> slice | torch.Tensor | None:
    """What ``logits_to_keep`` selects along the T positions: None for all of them (0, the default,
    so the full logits are computed exactly as without the argument), a slice for the last n, or
    a 1-D tensor of positions."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.dtype == torch.bool or logits_to_keep.is_floating_point():
            raise ValueError(f"logits_to_keep as a tensor must be 1-D integer positions, got "
                             f"{logits_to_keep.dtype} of shape {tuple(logits_to_keep.shape)}")
        return logits_to_keep
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 or a 1-D tensor of positions, got {logits_to_keep!r}")
    return None if logits_to_keep == 0 else slice(max(T - logits_to_keep, 0), None)


class SparseGPT(PreTrainedModel, GenerationMixin):
    config_class = SparseGPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: SparseGPTConfig):
        super().__init__(config)
        cfg = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                wpe=nn.Embedding(cfg.block_size, cfg.d_model),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=make_norm(cfg),
            )
        )
        self.final_resid = Site("final_resid", cfg.d_model, cfg.topk("resid_post_mlp", cfg.d_model))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(cfg.vocab_size))
        if cfg.enable_bigram_table:
            # A dense vocab x vocab logit bias by current token: it absorbs bigram
            # statistics so the sparse weights need not spend nonzeros on them.
            table = torch.zeros(cfg.vocab_size, cfg.vocab_size)
            if cfg.learnable_bigram_table:
                self.bigram_table = nn.Parameter(table)
            else:
                self.register_buffer("bigram_table", table)
        else:
            self.bigram_table = None
        if cfg.tied_unembed:
            self._tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "scaled_init", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, CausalSelfAttention) and module.sink_logit is not None:
            nn.init.zeros_(module.sink_logit)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def sites(self) -> SiteRegistry:
        """Every named activation site (built once; modules never change after init)."""
        reg = self.__dict__.get("_site_registry")
        if reg is None:
            reg = self.__dict__["_site_registry"] = SiteRegistry.of(self)
        return reg

    def weight_matrices(self) -> dict[str, nn.Parameter]:
        """The matrices that weight sparsity acts on, by parameter name.

        Embedding, positional embedding and unembedding are listed too (the
        sparsity config gives them their own fraction); the bigram table,
        biases, norm gains and sink logits are not matrices of the circuit.
        """
        out = {}
        for name, p in self.named_parameters():
            if p.ndim == 2 and name != "bigram_table":
                out[name] = p
        return out

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **unused,
    ) -> CausalLMOutput:
        """Logits for every position; ``labels`` (usually ``input_ids``) are shifted inside.

        ``logits_to_keep`` is transformers' argument of that name: an int n keeps the last
        n positions (0, the default, keeps all), a 1-D tensor keeps those positions of every
        row; the logits are then (B, kept, vocab). Only the unembedding is cut: every site
        still sees all T positions. Extra keyword arguments from generic callers
        (``attention_mask``, ``use_cache``...) are accepted and ignored: there is no
        padding-aware attention and no KV cache; right-pad and read the last real position.
        """
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        keep = _kept_positions(logits_to_keep, T)
        if keep is not None and labels is not None:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0 (the default) with them")
        tr = self.transformer
        x = tr.wte(input_ids) + tr.wpe.weight[:T].unsqueeze(0)  # (B, T, d_model)
        for block in tr.h:
            x = block(x)
        x = self.final_resid(x)
        tokens = input_ids
        if keep is not None:
            # After the last site (hooks see every position), before the unembedding: the bigram
            # table's rows are read at the same positions, by the tokens there.
            x, tokens = x[:, keep], input_ids[:, keep]  # (B, kept, d_model), (B, kept)
        logits = self.lm_head(tr.ln_f(x))  # (B, kept, vocab); kept = T by default
        if self.bigram_table is None:
            logits = logits + self.final_logits_bias
        else:
            # The table's rows (a fresh float32 tensor) take the bias and the unembedding in place: one
            # (B, kept, vocab) tensor instead of three.
            bias = F.embedding(tokens, self.bigram_table).add_(self.final_logits_bias)  # (B, kept, vocab)
            logits = bias.add_(logits) if bias.dtype == torch.promote_types(bias.dtype, logits.dtype) else logits + bias
        loss = None
        if labels is not None:
            # Position t predicts labels[t + 1]; the last position has no target (-100) rather than being
            # sliced off, which would copy the (B, T, vocab) logits and their gradient.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        # No KV cache: every step reads the whole (cropped) context.
        return {"input_ids": input_ids[:, -self.config.block_size :]}


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``sparse_gpt`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("sparse_gpt", SparseGPTConfig)
        AutoModelForCausalLM.register(SparseGPTConfig, SparseGPT)
    except ValueError:
        pass  # already registered


register_auto_classes()
