"""Named activation sites: the only way any code reaches a model's activations.

A :class:`Site` is an identity module with a stable name (``"3.mlp.post_act"``)
and a width. It applies AbsTopK when the model asks for activation sparsity
there, then runs the hooks that a :class:`SiteRegistry` context has installed:
recording, mean ablation, pruning masks, bridge reads and writes and
interventions are all such hooks. Contexts always remove their hooks on exit,
also after an exception, so no global state outlives a ``with`` block.

Example::

    with model.sites.record(["0.attn.q", "final_resid"]) as acts:
        model(input_ids)
    acts["0.attn.q"]            # (batch, pos, n_head * d_head)

    with model.sites.replace({"2.mlp.post_act": lambda x: x * mask}):
        logits = model(input_ids).logits
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from sparse_lm.topk import abs_topk_forward, mask_grad

# A hook sees the site and its current value; it returns a new value or None (keep).
Hook = Callable[["Site", torch.Tensor], "torch.Tensor | None"]


class _AbsTopKFn(torch.autograd.Function):
    """Keep the k entries of largest |x| along the last dim; zero the rest.

    Gradients flow only through the kept entries. The backward pass is a mask
    multiply instead of the gather/scatter pair autograd would build for the
    textbook ``zeros.scatter(idx, x.gather(idx))``, which is what makes it cheap;
    the selection is :func:`sparse_lm.topk.abs_topk_forward` (exact; on CPU a compiled
    op ~5x faster than torch.topk, with a pure-torch fallback).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        y, keep = abs_topk_forward(x, k)  # keep: uint8, saved for backward (1 byte per entry)
        ctx.save_for_backward(keep)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return mask_grad(grad, keep), None


def abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """AbsTopK along the last dimension: exactly k kept per row.

    Ties at the k-th |x| are broken deterministically (the lowest index on CPU, as torch.topk elsewhere;
    see :mod:`sparse_lm.topk` for the paths and ``SPARSE_LM_ABSTOPK``).
    """
    if k >= x.shape[-1]:
        return x
    if k <= 0:
        return torch.zeros_like(x)
    return _AbsTopKFn.apply(x, k)


class AbsTopK(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return abs_topk(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class Site(nn.Module):
    """Identity point in the forward pass, addressed by name; optional AbsTopK."""

    def __init__(self, name: str, width: int, k: int | None = None):
        super().__init__()
        self.name = name
        self.width = width
        self.k = k
        self.hooks: list[Hook] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k is not None:
            x = abs_topk(x, self.k)
        for hook in self.hooks:
            out = hook(self, x)
            if out is not None:
                x = out
        return x

    def extra_repr(self) -> str:
        return f"{self.name!r}, width={self.width}" + (f", k={self.k}" if self.k is not None else "")


class SiteRegistry:
    """The sites of one model, by name, and the scoped contexts that hook them."""

    def __init__(self, sites: Iterable[Site]):
        self._sites: dict[str, Site] = {}
        for s in sites:
            if s.name in self._sites:
                raise ValueError(f"two sites are named {s.name!r}")
            self._sites[s.name] = s

    @classmethod
    def of(cls, module: nn.Module) -> "SiteRegistry":
        return cls(m for m in module.modules() if isinstance(m, Site))

    # -- lookup --------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._sites)

    def __contains__(self, name: str) -> bool:
        return name in self._sites

    def __iter__(self) -> Iterator[Site]:
        return iter(self._sites.values())

    def __len__(self) -> int:
        return len(self._sites)

    def __getitem__(self, name: str) -> Site:
        try:
            return self._sites[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._sites, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"no site named {name!r}{hint} (this model has {len(self._sites)} sites, e.g. "
                           f"{', '.join(list(self._sites)[:4])}, ...)") from None

    def width(self, name: str) -> int:
        return self[name].width

    def check(self, names: Iterable[str], widths: Mapping[str, int] | None = None) -> None:
        """Fail early when a name is unknown or a width does not match."""
        for n in names:
            site = self[n]
            if widths is not None and n in widths and widths[n] != site.width:
                raise ValueError(f"site {n!r} has width {site.width}, but {widths[n]} was given")

    # -- contexts -------------------------------------------------------------
    @contextmanager
    def hooked(self, hooks: Mapping[str, Hook]) -> Iterator[None]:
        """Install ``{site name: hook}`` for the duration of the block."""
        sites = [(self[name], hook) for name, hook in hooks.items()]  # validate all names first
        installed: list[tuple[Site, Hook]] = []
        try:
            for site, hook in sites:
                site.hooks.append(hook)
                installed.append((site, hook))
            yield
        finally:
            for site, hook in installed:
                site.hooks.remove(hook)

    @contextmanager
    def record(self, names: Iterable[str] | None = None, *, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Yield a dict filled with the value of each named site (all sites if None)."""
        names = list(self._sites) if names is None else list(names)
        cache: dict[str, torch.Tensor] = {}

        def make(name: str) -> Hook:
            def hook(site: Site, x: torch.Tensor) -> None:
                cache[name] = x.detach() if detach else x

            return hook

        with self.hooked({n: make(n) for n in names}):
            yield cache

    @contextmanager
    def replace(self, fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Replace each named site's value by ``fn(value)`` (masks, ablations, edits)."""

        def make(fn: Callable[[torch.Tensor], torch.Tensor]) -> Hook:
            return lambda site, x: fn(x)

        with self.hooked({n: make(fn) for n, fn in fns.items()}):
            yield
