"""Named sites for foreign ``transformers`` models: the one place that hooks them.

A dense model of any architecture listed in `sparse_lm.arch` (GPT-2, GPT-Neo,
GPT-NeoX/Pythia, GPT-J, Phi-1/2, Llama, Mistral, Qwen2/3, OLMo, Gemma 1-3, Phi-3)
gets the same site names as a SparseGPT (``3.resid_mid``, ``3.mlp.post_act``...) and the same registry interface
(``record``, ``replace``, ``hooked``), so pruning, bridges and interventions
never know which kind of model they hold. Torch hooks are installed when a
registry context opens and removed when the last one closes, also after an
exception.

Use :func:`sites_of` for any model::

    sites = sites_of(model)        # model.sites for a SparseGPT, an adapter otherwise
    with sites.record(["0.resid_mid"]) as acts: model(ids)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

from sparse_lm.arch import ARCHS
from sparse_lm.sites import Hook, Site, SiteRegistry


def _out_features(module: nn.Module) -> int:
    """Output width of a Linear, or of GPT-2's Conv1D (weight stored (in, out))."""
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1]
    return module.weight.shape[0]


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _with_first(out, value):
    return (value, *out[1:]) if isinstance(out, tuple) else value


class HFSiteRegistry(SiteRegistry):
    """Sites of a ``transformers`` causal LM, realised with scoped torch hooks."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        hooked = sorted(name for name, a in ARCHS.items() if not a.native_sites)
        if model_type not in hooked:  # an unlisted one, or one that names its own sites (model.sites)
            raise ValueError(f"no site adapter for model_type {model_type!r}; supported: {', '.join(hooked)}")
        self.model, self.spec = model, ARCHS[model_type]
        self.blocks = model.get_submodule(self.spec.blocks)
        cfg = model.config
        d = cfg.hidden_size
        sites = []
        self._qkv_widths: list[int] = []
        # fused output column of each q, k, v channel stacked (None: already stacked), and its inverse
        order = self.spec.qkv_order(cfg) if self.spec.qkv_order is not None else None
        self._qkv_order = order
        self._qkv_unorder = torch.argsort(order) if order is not None else None
        for i, block in enumerate(self.blocks):
            widths = self._qkv(block)
            self._qkv_widths = widths
            sites += [Site(f"{i}.resid_in", d), Site(f"{i}.attn.act_in", d)]
            sites += [Site(f"{i}.attn.{n}", w) for n, w in zip("qkv", widths)]
            sites += [Site(f"{i}.attn.resid_delta", d), Site(f"{i}.resid_mid", d), Site(f"{i}.mlp.act_in", d),
                      Site(f"{i}.mlp.post_act", self._d_mlp(block)), Site(f"{i}.mlp.resid_delta", d)]
        sites.append(Site("final_resid", d))
        super().__init__(sites)
        self._handles: list = []
        self._depth = 0
        self._resid_in: dict[int, torch.Tensor] = {}

    def _qkv(self, block: nn.Module) -> list[int]:
        mods = [block.get_submodule(p) for p in self.spec.qkv]
        if len(mods) == 1:
            if self.spec.qkv_widths is not None:  # fused with grouped-query widths (Phi-3)
                return list(self.spec.qkv_widths(self.model.config))
            return [_out_features(mods[0]) // 3] * 3  # q, k, v stacked in equal thirds
        return [_out_features(m) for m in mods]

    def _d_mlp(self, block: nn.Module) -> int:
        mod, where = self.spec.post_act
        if where == "input":
            return block.get_submodule(mod).in_features
        fc = getattr(block.get_submodule(self.spec.mlp), "c_fc", None)
        return _out_features(fc) if fc is not None else self.model.config.intermediate_size

    # -- hook installation (only while some context is open) ---------------------
    def _apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        site = self._sites[name]
        return site(x) if site.hooks else x

    def _install(self) -> None:
        s = self.spec
        h = self._handles
        for i, block in enumerate(self.blocks):
            h.append(block.register_forward_pre_hook(self._pre_block(i), with_kwargs=True))
            if s.shared_norm:  # one norm's output feeds both branches: hook what each branch takes in
                for branch, name in ((s.attn, f"{i}.attn.act_in"), (s.mlp, f"{i}.mlp.act_in")):
                    h.append(block.get_submodule(branch).register_forward_pre_hook(self._in_hidden(name),
                                                                                   with_kwargs=True))
            else:
                h.append(block.get_submodule(s.norm1).register_forward_hook(self._out(f"{i}.attn.act_in")))
                h.append(block.get_submodule(s.norm2).register_forward_hook(self._out(f"{i}.mlp.act_in")))
            h.append(block.get_submodule(s.attn_out).register_forward_hook(self._attn_out(i)))
            h.append(block.get_submodule(s.mlp_out).register_forward_hook(self._out(f"{i}.mlp.resid_delta")))
            mod, where = s.post_act
            target = block.get_submodule(mod)
            if where == "output":
                h.append(target.register_forward_hook(self._out(f"{i}.mlp.post_act")))
            else:
                h.append(target.register_forward_pre_hook(self._in(f"{i}.mlp.post_act")))
            if len(s.qkv) == 1:
                h.append(block.get_submodule(s.qkv[0]).register_forward_hook(self._fused_qkv(i)))
            else:
                for n, path in zip("qkv", s.qkv):
                    h.append(block.get_submodule(path).register_forward_hook(self._out(f"{i}.attn.{n}")))
        final = self.model.get_submodule(s.final_norm)
        h.append(final.register_forward_pre_hook(self._in("final_resid")))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._resid_in.clear()

    def _out(self, name: str):
        def hook(module, args, out):
            if self._sites[name].hooks:
                return _with_first(out, self._apply(name, _first(out)))
        return hook

    def _in(self, name: str):
        def hook(module, args):
            if self._sites[name].hooks:
                return (self._apply(name, args[0]), *args[1:])
        return hook

    def _pre_block(self, i: int):
        def keep(y: torch.Tensor) -> None:
            self._resid_in[i] = y  # resid_mid = resid_in + attention output
        return self._in_hidden(f"{i}.resid_in", keep)

    def _in_hidden(self, name: str, seen=None):
        """A pre-hook on a module whose first input is the hidden states, passed by position or by keyword."""
        def hook(module, args, kwargs):
            in_args = "hidden_states" not in kwargs
            x = args[0] if in_args else kwargs["hidden_states"]
            y = self._apply(name, x)
            if seen is not None:
                seen(y)
            if y is x:
                return None
            if in_args:
                return (y, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": y}
        return hook

    def _attn_out(self, i: int):
        delta, mid = f"{i}.attn.resid_delta", f"{i}.resid_mid"

        def hook(module, args, out):
            if not (self._sites[delta].hooks or self._sites[mid].hooks):
                return None
            a = self._apply(delta, _first(out))
            if self._sites[mid].hooks:
                # The block adds the attention output to its input; to make the residual
                # stream read r' there, hand the block r' - input as the "attention output".
                r_in = self._resid_in[i]
                a = self._apply(mid, r_in + a) - r_in
            return _with_first(out, a)
        return hook

    def _fused_qkv(self, i: int):
        names = [f"{i}.attn.{n}" for n in "qkv"]

        def hook(module, args, out):
            if not any(self._sites[n].hooks for n in names):
                return None
            order, unorder = self._qkv_order, self._qkv_unorder
            stacked = out if order is None else out.index_select(-1, order.to(out.device))  # (..., q | k | v)
            parts = stacked.split(self._qkv_widths, dim=-1)
            new = torch.cat([self._apply(n, p) for n, p in zip(names, parts)], dim=-1)
            return new if unorder is None else new.index_select(-1, unorder.to(new.device))
        return hook

    @contextmanager
    def hooked(self, hooks: Mapping[str, Hook]) -> Iterator[None]:
        for name in hooks:
            self[name]  # unknown names fail before anything is installed
        if self._depth == 0:
            self._install()
        self._depth += 1
        try:
            with super().hooked(hooks):
                yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._remove()

    def active_torch_hooks(self) -> int:
        return len(self._handles)


def sites_of(model: nn.Module) -> SiteRegistry:
    """The site registry of any supported model (built once per model)."""
    sites = getattr(model, "sites", None)
    if isinstance(sites, SiteRegistry):
        return sites
    reg = model.__dict__.get("_hf_site_registry")
    if reg is None:
        reg = model.__dict__["_hf_site_registry"] = HFSiteRegistry(model)
    return reg


def residual_sites(sites: SiteRegistry, n_layer: int) -> list[str]:
    """The 2L+1 residual-stream sites in order: embeddings, after each attention, after each MLP."""
    names = []
    for i in range(n_layer):
        names += [f"{i}.resid_in", f"{i}.resid_mid"]
    names.append("final_resid")
    sites.check(names)
    return names
