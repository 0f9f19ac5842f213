"""A tracr-compiled transformer as a torch model with the toolkit's named sites.

The layout mirrors :class:`sparse_lm.model.SparseGPT` module for module
(``transformer.wte/wpe/h[i].attn.c_attn/c_proj``, ``mlp.c_fc/c_proj``,
``ln_1/ln_2/ln_f``, ``lm_head``, ``final_logits_bias``, ``bigram_table``) and
site for site (``0.resid_in``, ``0.attn.act_in``, ``0.attn.q/k/v/y``,
``0.attn.resid_delta``, ``0.resid_mid``, ``0.mlp.act_in/post_act/resid_delta``,
``final_resid``), so weight maps, site registries and heads written for
SparseGPT read it unchanged. What differs is what tracr compiles:

- no normalisation (``ln_*`` are identities with no gain: a gain of 1 per channel),
- ReLU MLPs, biases as tracr set them (zero for the compiled blocks),
- bidirectional attention (tracr's default ``causal=False``): every position
  reads every real position; a position holding the pad id is never read
  (tracr itself has no pad mask, so on unpadded inputs the two agree exactly,
  and a right-padded row equals tracr run on the row without its padding),
- a softmax scale of 1/sqrt(key_size) with tracr's key_size (heads padded to it),
- logits = ``logit_scale`` x the projection of the final residual onto the
  program's output dimensions (tracr's unembedding, before its argmax). The
  scale turns tracr's 0/1 one-hot outputs into confident logits, so that a
  cross-entropy task loss of the intact model is near zero instead of
  ~log(1 + (C-1)/e).

Nothing here imports jax: the weights arrive as numpy arrays (`from_tracr_params`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from sparse_lm.model import GPTNames
from sparse_lm.sites import Site, SiteRegistry

# Added to masked attention logits before the softmax (tracr uses -1e30 the same way).
MASKED_LOGIT = -1e30


class TracrConfig(GPTNames, PretrainedConfig):
    """Shape of a compiled tracr model, with SparseGPT's field names where they mean the same thing."""

    model_type = "tracr"

    def __init__(self, vocab_size: int = 4, block_size: int = 5, n_layer: int = 1, n_head: int = 1, d_head: int = 1,
                 d_model: int = 4, d_mlp: int = 1, n_classes: int = 1, pad_id: int | None = None,
                 bos_id: int = 0, logit_scale: float = 10.0, residual_labels: list[str] | None = None,
                 output_labels: list[str] | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.block_size = block_size  # the longest input, BOS included (tracr's max_seq_len + 1)
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_head = d_head  # tracr's key_size (= value size); every head is padded to it
        self.d_model = d_model
        self.d_mlp = d_mlp
        self.n_classes = n_classes
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.logit_scale = logit_scale
        self.residual_labels = list(residual_labels or [])
        self.output_labels = list(output_labels or [])
        self.bias = True
        self.afrac = None
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class _SurrogateReLU(torch.autograd.Function):
    """Forward: ReLU. Backward: the derivative of softplus(x / T) T = sigmoid(x / T)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, temp: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.temp = temp
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x / ctx.temp), None


class TracrAttention(nn.Module):
    def __init__(self, cfg: TracrConfig, layer: int):
        super().__init__()
        self.surrogate_temp: float | None = None  # see TracrTransformer.surrogate_gradients
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        d_attn = cfg.n_head * cfg.d_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * d_attn)  # q, k, v stacked, as SparseGPT
        self.c_proj = nn.Linear(d_attn, cfg.d_model)
        p = f"{layer}.attn."
        self.act_in = Site(p + "act_in", cfg.d_model)
        self.q = Site(p + "q", d_attn)
        self.k = Site(p + "k", d_attn)
        self.v = Site(p + "v", d_attn)
        self.y = Site(p + "y", d_attn)
        self.resid_delta = Site(p + "resid_delta", cfg.d_model)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = self.act_in(x)
        q, k, v = self.c_attn(x).split(self.n_head * self.d_head, dim=2)  # 3 x (B, T, nh*hs)
        q, k, v = self.q(q), self.k(k), self.v(v)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)  # (B, nh, T, T)
        scores = scores.masked_fill(~key_ok[:, None, None, :], MASKED_LOGIT)
        pattern = scores.softmax(dim=-1)  # (B, nh, T, T)
        temp = getattr(self, "surrogate_temp", None)  # (absent on models pickled before it existed)
        if temp is not None and torch.is_grad_enabled():
            soft = (scores / temp).softmax(dim=-1)
            pattern = soft + (pattern - soft).detach()  # the exact pattern, the softer one's gradient
        y = pattern @ v  # (B, nh, T, hs)
        y = self.y(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_head))  # (B, T, nh*hs)
        return self.resid_delta(self.c_proj(y))


class TracrMLP(nn.Module):
    def __init__(self, cfg: TracrConfig, layer: int):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.act = nn.ReLU()
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.surrogate_temp: float | None = None  # see TracrTransformer.surrogate_gradients
        p = f"{layer}.mlp."
        self.act_in = Site(p + "act_in", cfg.d_model)
        self.post_act = Site(p + "post_act", cfg.d_mlp)
        self.resid_delta = Site(p + "resid_delta", cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.c_fc(self.act_in(x))  # (B, T, d_mlp)
        temp = getattr(self, "surrogate_temp", None)  # (absent on models pickled before it existed)
        if temp is not None and torch.is_grad_enabled():
            h = self.post_act(_SurrogateReLU.apply(pre, temp))
        else:
            h = self.post_act(self.act(pre))
        return self.resid_delta(self.c_proj(h))


class TracrBlock(nn.Module):
    def __init__(self, cfg: TracrConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.Identity()  # tracr compiles without LayerNorm
        self.attn = TracrAttention(cfg, layer)
        self.ln_2 = nn.Identity()
        self.mlp = TracrMLP(cfg, layer)
        self.resid_in = Site(f"{layer}.resid_in", cfg.d_model)
        self.resid_mid = Site(f"{layer}.resid_mid", cfg.d_model)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        x = self.resid_in(x)
        x = self.resid_mid(x + self.attn(self.ln_1(x), key_ok))
        return x + self.mlp(self.ln_2(x))


@dataclass
class TracrOutput:
    logits: torch.Tensor  # (B, T, n_classes)

    def __getitem__(self, i: int) -> torch.Tensor:  # tuple-style access, as transformers outputs allow
        if i != 0:
            raise IndexError(i)
        return self.logits


class TracrTransformer(nn.Module):
    """The compiled model: token ids (BOS first, right-padded with the pad id) -> per-position class logits."""

    def __init__(self, config: TracrConfig):
        super().__init__()
        cfg = self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            wpe=nn.Embedding(cfg.block_size, cfg.d_model),
            h=nn.ModuleList(TracrBlock(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.Identity(),
        ))
        self.final_resid = Site("final_resid", cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.n_classes, bias=False)
        # SparseGPT's head adds these; kept so that code reading SparseGPT's head reads this one.
        self.register_buffer("final_logits_bias", torch.zeros(cfg.n_classes))
        self.bigram_table = None

    @property
    def sites(self) -> SiteRegistry:
        reg = self.__dict__.get("_site_registry")
        if reg is None:
            reg = self.__dict__["_site_registry"] = SiteRegistry.of(self)
        return reg

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def residual(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final residual stream (B, T, d_model): tracr's ``transformer_output``."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the compiled block_size {self.config.block_size} "
                             f"(max_seq_len + BOS)")
        if self.config.pad_id is None:
            key_ok = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        else:
            key_ok = input_ids != self.config.pad_id  # (B, T): padding is never attended to
        tr = self.transformer
        x = tr.wte(input_ids) + tr.wpe.weight[:T].unsqueeze(0)  # (B, T, d_model)
        for block in tr.h:
            x = block(x, key_ok)
        return self.final_resid(x)

    @contextmanager
    def surrogate_gradients(self, mlp_temp: float | None = 1.0, attn_temp: float | None = 10.0) -> Iterator[None]:
        """Within the block, exact forward passes with smooth gradients (None: the exact gradient).

        tracr's MLPs are step functions built from pairs of steep ReLUs and its attention patterns are
        saturated softmaxes, so the exact gradient of the output with respect to anything upstream of
        an MLP or inside an attention score is zero almost everywhere: a gradient-trained mask cannot
        tell the channels the program needs from the ones it ignores. Here a ReLU passes back the
        derivative of a softplus of temperature `mlp_temp` and an attention pattern the gradient of the
        softmax of scores / `attn_temp`, as the pruner's Heaviside masks pass back a sigmoid's.
        """
        mods = [m for b in self.transformer.h for m in (b.attn, b.mlp)]
        old = [getattr(m, "surrogate_temp", None) for m in mods]
        for b in self.transformer.h:
            b.mlp.surrogate_temp, b.attn.surrogate_temp = mlp_temp, attn_temp
        try:
            yield
        finally:
            for m, t in zip(mods, old):
                m.surrogate_temp = t

    def forward(self, input_ids: torch.Tensor, **unused) -> TracrOutput:
        x = self.residual(input_ids)
        return TracrOutput(logits=self.lm_head(self.transformer.ln_f(x)) + self.final_logits_bias)


def from_tracr_params(params: Mapping[str, Mapping[str, np.ndarray]], *, n_layer: int, n_head: int, key_size: int,
                      d_mlp: int, output_proj: np.ndarray, pad_id: int | None, bos_id: int,
                      residual_labels: list[str], output_labels: list[str], logit_scale: float = 10.0,
                      dtype: torch.dtype = torch.float32) -> TracrTransformer:
    """Build the torch model from tracr's haiku params (numpy arrays, haiku's (in, out) layout).

    ``output_proj`` is tracr's unembedding matrix (d_model, n_classes): the projection of the residual
    onto the output dimensions.
    """
    tok = np.asarray(params["token_embed"]["embeddings"])
    pos = np.asarray(params["pos_embed"]["embeddings"])
    d_model = tok.shape[1]
    cfg = TracrConfig(vocab_size=tok.shape[0], block_size=pos.shape[0], n_layer=n_layer, n_head=n_head,
                      d_head=key_size, d_model=d_model, d_mlp=d_mlp, n_classes=output_proj.shape[1], pad_id=pad_id,
                      bos_id=bos_id, logit_scale=logit_scale, residual_labels=residual_labels,
                      output_labels=output_labels)
    model = TracrTransformer(cfg)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.array(a, dtype=np.float64), dtype=dtype)

    with torch.no_grad():
        model.transformer.wte.weight.copy_(t(tok))
        model.transformer.wpe.weight.copy_(t(pos))
        for i, block in enumerate(model.transformer.h):
            p = f"transformer/layer_{i}"
            # haiku stores (in, out); nn.Linear wants (out, in).
            w_qkv = np.concatenate([params[f"{p}/attn/{n}"]["w"] for n in ("query", "key", "value")], axis=1)
            b_qkv = np.concatenate([params[f"{p}/attn/{n}"]["b"] for n in ("query", "key", "value")])
            block.attn.c_attn.weight.copy_(t(w_qkv).T)
            block.attn.c_attn.bias.copy_(t(b_qkv))
            block.attn.c_proj.weight.copy_(t(params[f"{p}/attn/linear"]["w"]).T)
            block.attn.c_proj.bias.copy_(t(params[f"{p}/attn/linear"]["b"]))
            block.mlp.c_fc.weight.copy_(t(params[f"{p}/mlp/linear_1"]["w"]).T)
            block.mlp.c_fc.bias.copy_(t(params[f"{p}/mlp/linear_1"]["b"]))
            block.mlp.c_proj.weight.copy_(t(params[f"{p}/mlp/linear_2"]["w"]).T)
            block.mlp.c_proj.bias.copy_(t(params[f"{p}/mlp/linear_2"]["b"]))
        model.lm_head.weight.copy_(logit_scale * t(output_proj).T)
    return model.to(dtype).eval()


def rotate_residual(model: TracrTransformer, seed: int = 0) -> TracrTransformer:
    """A copy whose residual stream is turned by a random orthogonal matrix R (d_model x d_model).

    Every weight that writes the residual (embeddings, attention and MLP output matrices and
    biases) is multiplied by R, every weight that reads it (q/k/v, the MLP input, the unembedding)
    by R^T, so logits, attention patterns, q/k/v channels and MLP neurons are unchanged while no
    residual channel lines up with a program variable any more, as in a dense model.
    """
    import copy

    g = torch.Generator().manual_seed(seed)
    d = model.config.d_model
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    r, upper = torch.linalg.qr(a)
    r = r * torch.sign(torch.diagonal(upper))[None, :]  # Haar-distributed (sign fix of the QR factor)
    out = copy.deepcopy(model)
    out.__dict__.pop("_site_registry", None)
    out.config = copy.deepcopy(model.config)
    out.config.residual_labels = [f"rot:{i}" for i in range(d)]
    dt = model.lm_head.weight.dtype

    def write(w: torch.Tensor) -> torch.Tensor:  # rows are residual vectors: x -> x R
        return (w.double() @ r).to(dt)

    def read(w: torch.Tensor) -> torch.Tensor:  # Linear (out, d_model) reading x R: (x R) W'^T = x W^T for W' = W R
        return (w.double() @ r).to(dt)

    with torch.no_grad():
        tr = out.transformer
        tr.wte.weight.copy_(write(tr.wte.weight))
        tr.wpe.weight.copy_(write(tr.wpe.weight))
        for block in tr.h:
            block.attn.c_attn.weight.copy_(read(block.attn.c_attn.weight))
            block.mlp.c_fc.weight.copy_(read(block.mlp.c_fc.weight))
            # Linear out = W h + b with out a residual vector (column): x_rot = R^T x, so W -> R^T W, b -> R^T b.
            block.attn.c_proj.weight.copy_((r.T @ block.attn.c_proj.weight.double()).to(dt))
            block.attn.c_proj.bias.copy_((r.T @ block.attn.c_proj.bias.double()).to(dt))
            block.mlp.c_proj.weight.copy_((r.T @ block.mlp.c_proj.weight.double()).to(dt))
            block.mlp.c_proj.bias.copy_((r.T @ block.mlp.c_proj.bias.double()).to(dt))
        out.lm_head.weight.copy_(read(out.lm_head.weight))
    return out


def class_logits_to_tracr(logits: torch.Tensor, model: TracrTransformer) -> torch.Tensor:
    """Undo the logit scale: tracr's own unembedded output (before its argmax)."""
    return logits / model.config.logit_scale


__all__ = [
    "TracrConfig",
    "TracrOutput",
    "TracrTransformer",
    "class_logits_to_tracr",
    "from_tracr_params",
    "rotate_residual",
]
