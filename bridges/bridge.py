"""Bridges between a dense and a sparse model's residual streams (SPEC §7).

Both models are addressed only through their named sites (:func:`sites_of`):
the 2L+1 residual sites ``0.resid_in, 0.resid_mid, 1.resid_in, ...,
final_resid`` of each are paired, and every pair gets

- an encoder, dense -> sparse: ``AbsTopK_k(W_enc h_d + b_enc)`` with
  ``k = afrac x d_sparse``, or, with ``afrac = "sparse"``, the sparse model's own
  AbsTopK k at the paired site (no AbsTopK where its residual stream is dense),
- a decoder, sparse -> dense: ``W_dec h_s + b_dec``.

Losses of one batch (each averaged over the paired sites, then weighted by
:class:`~bridges.config.BridgeSection`):

- ``nmse``: ``NMSE(enc(h_d), h_s) + NMSE(dec(h_s), h_d)`` where
  ``NMSE(pred, target) = sum ||pred - target||^2 / sum ||target - mean(target)||^2``,
  sums over every token of the batch and the mean per channel over the batch's
  tokens: predicting the batch mean scores 1, a perfect map 0.
- ``kl_d2s``: ``KL(p_dense || p_hybrid)`` per token, the hybrid running the
  dense model to its site, encoding, writing the result into the sparse
  model's paired site (a ``replace``) and finishing in the sparse model.
- ``kl_s2d``: the same with the sparse model run to its site, decoded and
  written into the frozen dense model, which finishes the forward pass.
- ``lm``: the sparse model's own next-token loss.

:class:`BridgedPair` holds the sparse model, the bridges and the frozen dense
model as one module for :class:`sparse_lm.trainer.Trainer`: ``forward``
returns the weighted loss, ``weight_matrices`` lists only the sparse model's
matrices (so weight sparsity acts on them and not on the bridges), and
``sites`` is the sparse model's registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bridges.config import BridgeSection
from sparse_lm.adapters import residual_sites, sites_of
from sparse_lm.arch import n_layers
from sparse_lm.sites import SiteRegistry, abs_topk

COMPONENTS = ("lm", "nmse_enc", "nmse_dec", "kl_d2s", "kl_s2d")


class BridgeError(ValueError):
    """A bridge that cannot be built (pairing, widths, vocabularies); says what to change."""


# ---------------------------------------------------------------------------
# pairing


@dataclass(frozen=True)
class SitePair:
    sparse: str
    dense: str
    d_sparse: int
    d_dense: int
    k_sparse: int | None = None  # the sparse model's own AbsTopK k at its site (None: a dense residual there)


def proportional_pairing(sparse_layers: int, dense_layers: int) -> list[int]:
    """Dense residual-site index for each sparse one: round(i x 2Ld / 2Ls), halves rounded up.

    Embeddings pair with embeddings and the final residual with the final residual.
    """
    ns, nd = 2 * sparse_layers, 2 * dense_layers
    return [math.floor(i * nd / ns + 0.5) for i in range(ns + 1)]


def pair_sites(sparse: nn.Module, dense: nn.Module, pairing: str | Sequence[int] = "proportional") -> list[SitePair]:
    """The paired residual sites of two models, checked to exist, with their widths."""
    s_sites, d_sites = sites_of(sparse), sites_of(dense)
    s_names = residual_sites(s_sites, n_layers(sparse))
    d_names = residual_sites(d_sites, n_layers(dense))
    if isinstance(pairing, str):
        if pairing != "proportional":
            raise BridgeError(f"pairing {pairing!r} is not 'proportional' or a list of dense site indices")
        index = proportional_pairing(n_layers(sparse), n_layers(dense))
    else:
        index = list(pairing)
        if len(index) != len(s_names):
            raise BridgeError(
                f"pairing lists {len(index)} dense site indices, but the sparse model has {len(s_names)} residual "
                f"sites ({', '.join(s_names)}): give one index in 0..{len(d_names) - 1} per sparse site"
            )
        bad = [i for i in index if not 0 <= i < len(d_names)]
        if bad:
            raise BridgeError(f"pairing indices {bad} are outside 0..{len(d_names) - 1} (the dense model has "
                              f"{len(d_names)} residual sites: {', '.join(d_names)})")
    return [SitePair(s, d_names[j], s_sites.width(s), d_sites.width(d_names[j]), s_sites[s].k)
            for s, j in zip(s_names, index)]


# ---------------------------------------------------------------------------
# the maps


class Bridges(nn.Module):
    """One encoder (dense -> sparse, Linear + AbsTopK) and one decoder (sparse -> dense, Linear) per site pair.

    The linear maps work in normalised units: the dense side divided by a fixed per-channel scale
    (``dense_scale.i``, the channel's standard deviation where the maps were fitted) and the sparse
    side by one scale per site (``sparse_scale.i``, the RMS of the sparse residual, followed as a
    running mean while a sparse model trains with its bridges). Both are plain linear reparametrisations
    (an encoder is still linear + AbsTopK, a decoder linear), but Adam's steps, which have the same size
    for every weight whatever the scale of its input and output, then mean the same thing on every map:
    a pretrained model's residual stream has channels thousands of times larger than the rest
    (SmolLM2's reach ~1e3), and a sparse model trained from scratch starts at an RMS of ~0.02 and grows
    by orders of magnitude. Without them the encoder's first step moved its output ~100x the sparse
    residual's spread (NMSE 1.6 -> 15,000 at step 2 against SmolLM2). Scales of 1 (the default, and
    bridges saved before the scales existed) give the plain maps.
    """

    def __init__(self, pairs: Sequence[SitePair], afrac: float | str | None = 0.25):
        super().__init__()
        self.pairs = list(pairs)
        self.afrac = afrac
        self.encoders = nn.ModuleList(nn.Linear(p.d_dense, p.d_sparse) for p in self.pairs)
        self.decoders = nn.ModuleList(nn.Linear(p.d_sparse, p.d_dense) for p in self.pairs)
        for i, p in enumerate(self.pairs):
            self.register_buffer(f"dense_scale_{i}", torch.ones(p.d_dense))
            self.register_buffer(f"sparse_scale_{i}", torch.ones(()))

    def dense_scale(self, i: int) -> torch.Tensor:
        return getattr(self, f"dense_scale_{i}")

    def sparse_scale(self, i: int) -> torch.Tensor:
        return getattr(self, f"sparse_scale_{i}")

    @torch.no_grad()
    def follow_sparse_scale(self, i: int, h_sparse: torch.Tensor, momentum: float) -> None:
        """Move ``sparse_scale.i`` toward the RMS of `h_sparse` (a running mean; momentum 0 keeps it)."""
        if momentum > 0:
            rms = h_sparse.detach().float().pow(2).mean().sqrt().clamp_min(1e-6)
            self.sparse_scale(i).lerp_(rms.to(self.sparse_scale(i).dtype), momentum)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Bridges saved before the scales existed are the plain maps: scales of 1.
        for i in range(len(self.pairs)):
            for name in (f"dense_scale_{i}", f"sparse_scale_{i}"):
                state_dict.setdefault(prefix + name, torch.ones_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def k(self, i: int) -> int | None:
        """AbsTopK k of encoder i (None: the encoder output stays dense)."""
        if self.afrac == "sparse":  # as sparse as what it predicts: the site's own AbsTopK, if any
            return self.pairs[i].k_sparse
        width = self.pairs[i].d_sparse
        if self.afrac is None or int(self.afrac * width) >= width:
            return None
        return max(1, int(self.afrac * width))

    def encode(self, i: int, h_dense: torch.Tensor) -> torch.Tensor:
        """(..., d_dense) -> (..., d_sparse)."""
        lin = self.encoders[i]
        x = h_dense.to(lin.weight.dtype) / self.dense_scale(i).to(lin.weight.dtype)
        z = lin(x) * self.sparse_scale(i).to(lin.weight.dtype)
        k = self.k(i)
        return z if k is None else abs_topk(z, k)

    def decode(self, i: int, h_sparse: torch.Tensor) -> torch.Tensor:
        """(..., d_sparse) -> (..., d_dense)."""
        lin = self.decoders[i]
        x = h_sparse.to(lin.weight.dtype) / self.sparse_scale(i).to(lin.weight.dtype)
        return lin(x) * self.dense_scale(i).to(lin.weight.dtype)

    @torch.no_grad()
    def fit_least_squares(self, dense_acts: Sequence[torch.Tensor], sparse_acts: Sequence[torch.Tensor],
                          ridge: float = 1e-3) -> None:
        """Set the scales from paired activations (tokens, d) per pair, then every map to the ridge-regression
        fit of its target in those units.

        A starting point that already scores NMSE < 1; AbsTopK is left out of the encoder's fit.
        """
        for i in range(len(self.pairs)):
            h_d, h_s = dense_acts[i].flatten(0, -2).float(), sparse_acts[i].flatten(0, -2).float()
            d_scale = h_d.std(0)  # (d_dense,)
            d_scale = d_scale.clamp_min(1e-3 * float(d_scale.mean()) + 1e-12)  # a constant channel stays finite
            s_scale = h_s.pow(2).mean().sqrt().clamp_min(1e-6)
            self.dense_scale(i).copy_(d_scale)
            self.sparse_scale(i).copy_(s_scale)
            x_d, x_s = h_d / d_scale, h_s / s_scale
            _ridge_fit(self.encoders[i], x_d, x_s, ridge)
            _ridge_fit(self.decoders[i], x_s, x_d, ridge)

    @torch.no_grad()
    def set_identity(self) -> None:
        """Encoders and decoders = I (widths must match): a model bridged to itself is then exact."""
        for p, enc, dec in zip(self.pairs, self.encoders, self.decoders):
            if p.d_sparse != p.d_dense:
                raise BridgeError(f"identity maps need equal widths; {p.sparse} has {p.d_sparse}, "
                                  f"{p.dense} {p.d_dense}")
            for lin in (enc, dec):
                lin.weight.copy_(torch.eye(p.d_sparse))
                lin.bias.zero_()
        for i in range(len(self.pairs)):
            self.dense_scale(i).fill_(1.0)
            self.sparse_scale(i).fill_(1.0)


def _ridge_fit(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, ridge: float) -> None:
    """lin <- argmin ||x W^T + b - y||^2 + lam ||W||^2, lam = ridge x mean(diag(xc^T xc)) (xc: x centred)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    cov = xc.T @ xc  # (d_in, d_in)
    lam = ridge * float(cov.diagonal().mean()) + 1e-12
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    w = torch.linalg.solve(cov + lam * eye, xc.T @ yc)  # (d_in, d_out)
    lin.weight.copy_(w.T.to(lin.weight.dtype))
    lin.bias.copy_((my - mx @ w).to(lin.bias.dtype))


# ---------------------------------------------------------------------------
# losses


def nmse(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8, detach_spread: bool = False) -> torch.Tensor:
    """sum ||pred - target||^2 / sum ||target - mean||^2 over all tokens (mean per channel over tokens).

    With `detach_spread` the denominator is a constant for the gradient: a sparse model that trains
    with its bridges could otherwise lower NMSE(enc(h_dense), h_sparse) by inflating its own variance
    rather than by becoming predictable (jacobcd52/sparse_pretrain_public detaches it).
    """
    p = pred.flatten(0, -2).float()  # (tokens, d)
    t = target.flatten(0, -2).float()
    spread = (t - t.mean(0)).pow(2).sum()
    if detach_spread:
        spread = spread.detach()
    return (p - t).pow(2).sum() / spread.clamp_min(eps)


def kl_dense_hybrid(dense_logits: torch.Tensor, hybrid_logits: torch.Tensor,
                    n_vocab: int | None = None) -> torch.Tensor:
    """Mean over tokens of KL(p_dense || p_hybrid), in float32 (logits (B, T, V), the first n_vocab used)."""
    lp = F.log_softmax(dense_logits[..., :n_vocab].float(), dim=-1)
    lq = F.log_softmax(hybrid_logits[..., :n_vocab].float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def weighted_loss(cfg: BridgeSection, comps: Mapping[str, Any]) -> Any:
    """The bridge objective from its components (tensors or floats): each term times its weight in `cfg`."""
    return (cfg.lm * comps["lm"] + cfg.nmse * (comps["nmse_enc"] + comps["nmse_dec"])
            + cfg.kl_d2s * comps["kl_d2s"] + cfg.kl_s2d * comps["kl_s2d"])


@dataclass
class BridgeOutput:
    """What :class:`BridgedPair` returns: the weighted loss, the sparse logits and each component."""

    loss: torch.Tensor
    logits: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# the pair


class BridgedPair(nn.Module):
    """Sparse model + bridges + frozen dense model, trained as one module by :class:`Trainer`.

    ``train_sparse=False`` freezes the sparse model too (bridges alone). The dense
    model (and a frozen sparse model) stays in eval mode whatever ``train()`` says,
    so dropout never runs in a teacher.
    """

    def __init__(self, sparse: nn.Module, dense: nn.Module, cfg: BridgeSection | None = None, *,
                 train_sparse: bool = True, bridges: Bridges | None = None):
        super().__init__()
        cfg = cfg or BridgeSection()
        self.cfg = cfg
        self.sparse, self.dense = sparse, dense
        self.train_sparse = train_sparse
        for p in dense.parameters():
            p.requires_grad_(False)
        if not train_sparse:
            for p in sparse.parameters():
                p.requires_grad_(False)
        pairs = pair_sites(sparse, dense, cfg.pairing)
        self.bridges = bridges if bridges is not None else Bridges(pairs, cfg.afrac)
        if self.bridges.pairs != pairs:
            raise BridgeError(f"the bridges were built for other sites: {self.bridges.pairs} vs {pairs}")
        vs, vd = sparse.config.vocab_size, dense.config.vocab_size
        # A dense vocabulary may be padded past the tokenizer; the KL reads the shared first ids only.
        self.n_vocab = min(vs, vd)
        self.last_components: dict[str, float] = {}
        self.train(self.training)

    # -- what Trainer needs ------------------------------------------------------
    @property
    def pairs(self) -> list[SitePair]:
        return self.bridges.pairs

    @property
    def sites(self) -> SiteRegistry:
        """The sparse model's sites (dead-neuron statistics, circuits)."""
        return sites_of(self.sparse)

    @property
    def dense_sites(self) -> SiteRegistry:
        return sites_of(self.dense)

    def weight_matrices(self) -> dict[str, nn.Parameter]:
        """The sparse model's matrices under their names in this module (``sparse.transformer.h.0.mlp.c_fc.weight``).

        The bridges' maps are not listed: weight sparsity (and weight decay) never touch them.
        """
        return {f"sparse.{name}": p for name, p in self.sparse.weight_matrices().items()}

    def lr_scales(self) -> dict[nn.Parameter, float]:
        """The maps learn at ``bridge.map_lr_scale`` times the sparse model's lr (read by Trainer)."""
        return {p: self.cfg.map_lr_scale for p in self.bridges.parameters()}

    def train(self, mode: bool = True) -> "BridgedPair":
        super().train(mode)
        self.dense.eval()
        if not self.train_sparse:
            self.sparse.eval()
        return self

    # -- single hybrids ------------------------------------------------------------
    def run_sparse(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.sparse(input_ids=input_ids, labels=labels)

    def run_dense(self, input_ids: torch.Tensor):
        return self.dense(input_ids=input_ids, use_cache=False)

    def d2s_logits(self, input_ids: torch.Tensor, i: int, h_dense: torch.Tensor) -> torch.Tensor:
        """Sparse logits with sparse site ``pairs[i].sparse`` replaced by the encoded dense activation."""
        z = self.bridges.encode(i, h_dense)  # (B, T, d_sparse)
        with self.sites.replace({self.pairs[i].sparse: lambda x: z.to(x.dtype)}):
            return self.run_sparse(input_ids).logits

    def s2d_logits(self, input_ids: torch.Tensor, i: int, h_sparse: torch.Tensor) -> torch.Tensor:
        """Dense logits with dense site ``pairs[i].dense`` replaced by the decoded sparse activation."""
        y = self.bridges.decode(i, h_sparse)  # (B, T, d_dense)
        with self.dense_sites.replace({self.pairs[i].dense: lambda x: y.to(x.dtype)}):
            return self.run_dense(input_ids).logits

    def hybrid_logits(self, input_ids: torch.Tensor, direction: str, i: int) -> torch.Tensor:
        """One hybrid forward from scratch: 'd2s' (dense to site i, then sparse) or 's2d'."""
        if direction == "d2s":
            name = self.pairs[i].dense
            with torch.no_grad(), self.dense_sites.record([name]) as acts:
                self.run_dense(input_ids)
            return self.d2s_logits(input_ids, i, acts[name])
        if direction == "s2d":
            name = self.pairs[i].sparse
            with self.sites.record([name], detach=False) as acts:
                self.run_sparse(input_ids)
            return self.s2d_logits(input_ids, i, acts[name])
        raise ValueError(f"direction must be 'd2s' or 's2d', got {direction!r}")

    # -- the loss --------------------------------------------------------------------
    def kl_sites(self) -> list[int]:
        """Pair indices for this step's KL terms: all in eval mode, else ``sites_per_step`` drawn at random."""
        n, k = len(self.pairs), self.cfg.sites_per_step
        if not self.training or k is None or k >= n:
            return list(range(n))
        return sorted(torch.randperm(n)[:k].tolist())  # global torch RNG: restored on resume by the Trainer

    def components(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   kl_sites: Sequence[int] | None = None):
        """Every loss component, averaged over sites (KL over ``kl_sites``, default all).

        Returns (components, sparse output, dense logits, per-site values: lists with None
        where a KL site was not drawn).
        """
        pairs = self.pairs
        d_names = sorted({p.dense for p in pairs})
        with torch.no_grad(), self.dense_sites.record(d_names) as d_acts:
            dense_logits = self.run_dense(input_ids).logits
        with self.sites.record([p.sparse for p in pairs], detach=False) as s_acts:
            out = self.run_sparse(input_ids, labels)
        sites = list(range(len(pairs))) if kl_sites is None else list(kl_sites)
        site: dict[str, list] = {"nmse_enc": [], "nmse_dec": [], "kl_d2s": [None] * len(pairs),
                                 "kl_s2d": [None] * len(pairs)}
        for i, p in enumerate(pairs):
            h_d, h_s = d_acts[p.dense], s_acts[p.sparse]
            if self.training and self.train_sparse and torch.is_grad_enabled():  # training steps only
                self.bridges.follow_sparse_scale(i, h_s, self.cfg.scale_momentum)
            detach = self.cfg.nmse_detach_spread
            site["nmse_enc"].append(nmse(self.bridges.encode(i, h_d), h_s, detach_spread=detach))
            site["nmse_dec"].append(nmse(self.bridges.decode(i, h_s), h_d, detach_spread=detach))
        for i in sites:
            p = pairs[i]
            site["kl_d2s"][i] = kl_dense_hybrid(dense_logits, self.d2s_logits(input_ids, i, d_acts[p.dense]),
                                                self.n_vocab)
            site["kl_s2d"][i] = kl_dense_hybrid(dense_logits, self.s2d_logits(input_ids, i, s_acts[p.sparse]),
                                                self.n_vocab)
        comps = {name: torch.stack([v for v in vals if v is not None]).mean() for name, vals in site.items()}
        comps["lm"] = out.loss if out.loss is not None else dense_logits.new_zeros(())
        return comps, out, dense_logits, site

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **unused) -> BridgeOutput:
        comps, out, dense_logits, _ = self.components(input_ids, labels, self.kl_sites())
        loss = weighted_loss(self.cfg, comps)
        if self.training:  # only training steps: an evaluation in between must not overwrite them
            self.last_components = {k: float(v.detach()) for k, v in comps.items()}
        else:  # the gate's yardstick beside the hybrids, so every evaluation during training has it
            comps["kl_no_bridge"] = kl_dense_hybrid(dense_logits, out.logits, self.n_vocab)
        return BridgeOutput(loss=loss, logits=out.logits, components=comps)


# ---------------------------------------------------------------------------
# initialisation and evaluation


@torch.no_grad()
def init_least_squares(pair: BridgedPair, tokens: torch.Tensor, batch_size: int = 8, max_batches: int = 4) -> int:
    """Fit every map by ridge regression on the activations of a few blocks; returns the tokens used."""
    device = next(pair.bridges.parameters()).device
    was_training = pair.training
    pair.eval()
    d_acts: list[list[torch.Tensor]] = [[] for _ in pair.pairs]
    s_acts: list[list[torch.Tensor]] = [[] for _ in pair.pairs]
    n = min(len(tokens), batch_size * max_batches)
    try:
        for start in range(0, n, batch_size):
            ids = tokens[start:start + batch_size].long().to(device)
            with pair.dense_sites.record(sorted({p.dense for p in pair.pairs})) as d:
                pair.run_dense(ids)
            with pair.sites.record([p.sparse for p in pair.pairs]) as s:
                pair.run_sparse(ids)
            for i, p in enumerate(pair.pairs):
                d_acts[i].append(d[p.dense].flatten(0, -2).float())
                s_acts[i].append(s[p.sparse].flatten(0, -2).float())
    finally:
        pair.train(was_training)
    pair.bridges.fit_least_squares([torch.cat(a) for a in d_acts], [torch.cat(a) for a in s_acts])
    return n * tokens.shape[1]



@torch.no_grad()
def evaluate_bridges(pair: BridgedPair, tokens: torch.Tensor, batch_size: int = 8, max_batches: int | None = 8) -> dict:
    """Every component at every paired site on held-out blocks (token-weighted over batches).

    Also the two models' own losses and KL(dense || sparse), the yardstick for the
    hybrid KLs: a bridge is useful when its hybrids sit far below it.
    """
    was_training = pair.training
    pair.eval()
    device = next(pair.bridges.parameters()).device
    n = len(tokens) if max_batches is None else min(len(tokens), batch_size * max_batches)
    sums: dict[str, float] = {}
    site_sums = {k: [0.0] * len(pair.pairs) for k in ("nmse_enc", "nmse_dec", "kl_d2s", "kl_s2d")}
    weight = 0
    try:
        for start in range(0, n, batch_size):
            ids = tokens[start:start + batch_size].long().to(device)
            w = ids.shape[0]
            comps, out, dense_logits, site = pair.components(ids, ids)
            extra = {
                "dense_lm": F.cross_entropy(dense_logits[:, :-1, :pair.n_vocab].flatten(0, 1).float(),
                                            ids[:, 1:].flatten()),
                "kl_dense_sparse": kl_dense_hybrid(dense_logits, out.logits, pair.n_vocab),
            }
            for k, v in {**comps, **extra}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * w
            for k, vals in site_sums.items():
                for i, v in enumerate(site[k]):
                    vals[i] += float(v) * w
            weight += w
    finally:
        pair.train(was_training)
    res = {k: v / weight for k, v in sums.items()}
    res["total"] = weighted_loss(pair.cfg, res)
    res["per_site"] = [{"sparse": p.sparse, "dense": p.dense, **{k: v[i] / weight for k, v in site_sums.items()}}
                       for i, p in enumerate(pair.pairs)]
    res["sequences"] = weight
    return res


def quality_gate(metrics: Mapping[str, Any], nmse_max: float = 0.3) -> dict:
    """Whether a bridge may be called trained, from :func:`evaluate_bridges` on validation.

    Passed when both hybrid KLs (means over sites) are below KL(dense || sparse) on the same
    batches (``kl_dense_sparse``: the bridge must beat no bridge at all) and the NMSE of both
    maps is below ``nmse_max``. ``reasons`` lists every failed condition with its numbers.
    """
    gate = {"kl_d2s": float(metrics["kl_d2s"]), "kl_s2d": float(metrics["kl_s2d"]),
            "kl_no_bridge": float(metrics["kl_dense_sparse"]), "nmse_enc": float(metrics["nmse_enc"]),
            "nmse_dec": float(metrics["nmse_dec"]), "nmse_max": float(nmse_max)}
    reasons = []
    for k, what in (("kl_d2s", "KL(dense || dense->sparse hybrid)"), ("kl_s2d", "KL(dense || sparse->dense hybrid)")):
        if not gate[k] < gate["kl_no_bridge"]:
            reasons.append(f"{k} {gate[k]:.4f} >= kl_no_bridge {gate['kl_no_bridge']:.4f}: {what} is no better "
                           f"than the sparse model without a bridge")
    for k in ("nmse_enc", "nmse_dec"):
        if not gate[k] < nmse_max:
            reasons.append(f"{k} {gate[k]:.4f} >= {nmse_max:g}")
    return {"passed": not reasons, **gate, "reasons": reasons}


def format_gate(gate: Mapping[str, Any]) -> str:
    verdict = "PASSED" if gate["passed"] else "FAILED"
    text = (f"quality gate {verdict}: kl_d2s {gate['kl_d2s']:.4f}, kl_s2d {gate['kl_s2d']:.4f} vs kl_no_bridge "
            f"{gate['kl_no_bridge']:.4f}; nmse_enc {gate['nmse_enc']:.4f}, nmse_dec {gate['nmse_dec']:.4f} "
            f"(< {gate['nmse_max']:g})")
    return text + "".join(f"\n     - {r}" for r in gate["reasons"])
