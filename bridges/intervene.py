"""The paper's intervention: move a sparse circuit channel, carry the change through the bridge into the dense model.

Given a bridge folder, a circuit found by the pruner in the bridge's sparse
model (``circuit.json``) and the circuit's task:

1. Residual-channel nodes of the circuit (kinds ``attn.act_in``,
   ``attn.resid_delta``, ``mlp.act_in``, ``mlp.resid_delta``; their channel is
   a residual channel) are placed at the bridge's residual site they read or
   write: ``L.attn.act_in`` reads ``L.resid_in``, ``L.attn.resid_delta`` writes
   ``L.resid_mid``, ``L.mlp.act_in`` reads ``L.resid_mid``,
   ``L.mlp.resid_delta`` writes ``L+1.resid_in`` (``final_resid`` after the
   last layer).
2. The sparse model runs on the task's prompts; the channel whose mean at the
   last prompt position differs most between the two families picks the site,
   and the circuit's best-separating channels there are moved together
   (``--channels N``, default 8, fewer when the circuit has fewer). One channel is the paper's picture; a small model
   spreads the quote type over several residual channels, and moving only
   the best of them barely moves the task (in the main job's 71-node
   circuit: +0.055 in P at alpha 2 with one channel, +0.40 with eight).
3. For a prompt of family f, the intervention moves the channel from its
   mean on f toward its mean on the other family: ``x_c += alpha (m_other -
   m_f)``. The decoder is linear, so the dense residual at the paired dense
   site changes by ``W_dec[:, c] alpha (m_other - m_f)`` (the bias cancels);
   that change is added at the last prompt position and the dense model runs on.
4. Reported over the sweep of ``alpha``: the change of the dense model's
   probability of the other family's completion (two-token softmax,
   averaged over prompts), the same intervention inside the sparse model
   (reference), and a control: random residual channels of the same count
   at the same site, whose dense change is scaled to the same norm (several
   draws). ``alpha = 0`` changes nothing, exactly.

Writes ``intervention.json`` and ``intervention.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from sparse_lm.io import atomic_write_bytes, atomic_write_text
from sparse_lm.sites import SiteRegistry

RESIDUAL_KINDS = ("attn.act_in", "attn.resid_delta", "mlp.act_in", "mlp.resid_delta", "resid_in", "resid_mid")
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
CHUNK_TOKENS = 8192  # padded tokens per forward pass


@dataclass(frozen=True)
class Candidate:
    """A residual channel of the circuit, at the bridge site where it is read or written."""

    node_ids: tuple[Any, ...]
    node_sites: tuple[str, ...]
    bridge_site: str
    channel: int


def bridge_site_of(node_site: str, n_layer: int) -> str:
    """The residual site a residual-channel node reads (``act_in``) or writes (``resid_delta``)."""
    if node_site == "final_resid":
        return node_site
    head, _, kind = node_site.partition(".")
    if not head.isdigit() or kind not in RESIDUAL_KINDS:
        raise ValueError(f"{node_site!r} is not a residual-channel node site (kinds: {', '.join(RESIDUAL_KINDS)})")
    layer = int(head)
    if kind in ("attn.act_in", "resid_in"):
        return f"{layer}.resid_in"
    if kind in ("attn.resid_delta", "mlp.act_in", "resid_mid"):
        return f"{layer}.resid_mid"
    return f"{layer + 1}.resid_in" if layer + 1 < n_layer else "final_resid"  # mlp.resid_delta


def read_circuit(folder: str | Path) -> dict:
    path = Path(folder)
    path = path if path.suffix == ".json" else path / "circuit.json"
    if not path.is_file():
        raise FileNotFoundError(f"no circuit at {str(path)!r}: run the pruner first (it writes circuit.json)")
    circuit = json.loads(path.read_text())
    if not isinstance(circuit.get("nodes"), list):
        raise ValueError(f"{path} has no 'nodes' list: not a circuit.json written by the pruner")
    return circuit


def residual_candidates(circuit: dict, n_layer: int) -> list[Candidate]:
    """The circuit's residual channels, one per (bridge site, channel), in the order the nodes come."""
    found: dict[tuple[str, int], tuple[list, list]] = {}
    for node in circuit["nodes"]:
        site = node.get("site") or f"{node['layer']}.{node['kind']}"
        kind = node.get("kind") or site.partition(".")[2]
        if kind not in RESIDUAL_KINDS and site != "final_resid":
            continue
        key = (bridge_site_of(site, n_layer), int(node["channel"]))
        ids, sites = found.setdefault(key, ([], []))
        ids.append(node.get("id"))
        sites.append(site)
    return [Candidate(tuple(ids), tuple(sites), s, c) for (s, c), (ids, sites) in found.items()]


# ---------------------------------------------------------------------------
# forward passes with an additive change at the last prompt position


def _last(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, d) at each row's last prompt position."""
    return x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]


@contextmanager
def added_at_last_position(sites: SiteRegistry, site: str, delta: torch.Tensor,
                           lengths: torch.Tensor) -> Iterator[None]:
    """Add ``delta`` (B, d) to residual site ``site`` at each row's last prompt position.

    A change of ``L.resid_mid`` is written into ``L.attn.resid_delta`` (the block adds
    that to the residual), which keeps every other position bit-for-bit unchanged.
    """
    head, _, kind = site.partition(".")
    target = f"{head}.attn.resid_delta" if kind == "resid_mid" else site

    def add(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        rows = torch.arange(x.shape[0], device=x.device)
        pos = lengths.to(x.device) - 1
        y[rows, pos] = y[rows, pos] + delta.to(device=x.device, dtype=x.dtype)
        return y

    with sites.replace({target: add}):
        yield


@torch.no_grad()
def p_other(model, sites: SiteRegistry, batch, site: str | None = None,
            delta: torch.Tensor | None = None, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """(B,) probability of the other family's completion under the two-token softmax, optionally with a change
    ``delta`` (B, d) added at ``site`` at each prompt's last position."""
    from tasks.loss import length_chunks, margins, task_logits_last

    out = torch.empty(len(batch.lengths))
    for idx in length_chunks(batch.lengths, chunk_tokens):
        sub = batch.select(idx.to(batch.lengths.device))
        if site is None:
            last = task_logits_last(model, sub.input_ids, sub.lengths)
        else:
            with added_at_last_position(sites, site, delta[idx.to(delta.device)], sub.lengths):
                last = task_logits_last(model, sub.input_ids, sub.lengths)
        out[idx] = torch.sigmoid(-margins(last, sub.target_ids, sub.distractor_ids)).float().cpu()
    return out


@torch.no_grad()
def family_means(model, sites: SiteRegistry, batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per site (2, d): the mean at the last prompt position over each family's prompts."""
    from tasks.loss import task_logits_last

    with sites.record(list(names)) as acts:
        task_logits_last(model, batch.input_ids, batch.lengths)
    fam = batch.family.to(acts[names[0]].device)
    out = {}
    for n in names:
        last = _last(acts[n], batch.lengths).float()  # (B, d)
        out[n] = torch.stack([last[fam == f].mean(0) for f in (0, 1)]).cpu()
    return out


# ---------------------------------------------------------------------------
# the experiment


def _by_family(values: torch.Tensor, family: torch.Tensor) -> tuple[float, list[float]]:
    """Mean within each family, then over families; and the two family means."""
    per = [float(values[family == f].double().mean()) for f in (0, 1)]
    return sum(per) / 2, per


def intervene(pair, tokenizer, task, circuit: dict, *, alphas: Sequence[float] = DEFAULT_ALPHAS, n_channels: int = 8,
              n_controls: int = 8, split: str = "test", n_examples: int = 256, seed: int = 0) -> dict:
    """Run the sweep (see the module docstring); returns the JSON-able result."""
    from bridges.train import context_length
    from sparse_lm.adapters import n_layers
    from tasks.loss import encode_examples

    if 0.0 not in alphas:
        alphas = [0.0, *alphas]
    alphas = sorted(float(a) for a in alphas)
    if circuit.get("task") and circuit["task"] != task.name:
        raise ValueError(f"the circuit was found for task {circuit['task']!r}, not {task.name!r}")
    resolved = task.resolve(tokenizer, task.examples(split, n_examples, seed))
    contexts = [n for n in (context_length(pair.sparse), context_length(pair.dense)) if n]
    limit = min(contexts) if contexts else None
    examples = resolved.examples
    if limit is not None:  # prompts longer than a model's context cannot be run: leave them out, and say so
        lengths = [len(ids) for ids in tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]]
        examples = [ex for ex, n in zip(examples, lengths) if n <= limit]
        if not examples:
            raise ValueError(f"every prompt of task {task.name!r} is longer than the models' context ({limit} tokens)")
    too_long = len(resolved.examples) - len(examples)
    batch = encode_examples(tokenizer, examples, max_length=limit)
    device = next(pair.bridges.parameters()).device
    batch = batch.to(device)
    family = batch.family.cpu()
    if family.unique().numel() < 2:
        raise ValueError(f"task {task.name!r} kept prompts of one family only; cannot compare families")

    sparse_index = {p.sparse: i for i, p in enumerate(pair.pairs)}
    cands = residual_candidates(circuit, n_layers(pair.sparse))
    if not cands:
        raise ValueError(f"the circuit has no residual-channel nodes (kinds {', '.join(RESIDUAL_KINDS[:4])}): "
                         f"nothing to carry through a residual bridge")
    missing = sorted({c.bridge_site for c in cands} - set(sparse_index))
    if missing:
        raise ValueError(f"circuit sites {missing} have no bridge (bridged sparse sites: {', '.join(sparse_index)})")
    width = pair.pairs[0].d_sparse
    bad = [c for c in cands if not 0 <= c.channel < width]
    if bad:
        raise ValueError(f"circuit channel {bad[0].channel} at {bad[0].node_sites[0]} is outside the sparse residual "
                         f"width {width}: the circuit is from another model")

    sites_needed = sorted({c.bridge_site for c in cands})
    means = family_means(pair.sparse, pair.sites, batch, sites_needed)
    def separation(c: Candidate) -> float:
        m = means[c.bridge_site]  # (2, d_sparse)
        return abs(float(m[1, c.channel] - m[0, c.channel]))

    scored = sorted(cands, key=separation, reverse=True)
    best = scored[0]
    chosen = [c for c in scored if c.bridge_site == best.bridge_site][:n_channels]
    site = best.bridge_site
    i = sparse_index[site]
    dense_site = pair.pairs[i].dense
    channels = torch.tensor([c.channel for c in chosen])
    diff = (means[site][1] - means[site][0]).float()  # (d_sparse,) mean on family 1 minus mean on family 0
    toward = (1 - 2 * family).float()[:, None]  # (B, 1): +1 moves family 0 toward 1, -1 moves family 1 toward 0
    W = pair.bridges.decoders[i].weight.detach().float().cpu()  # (d_dense, d_sparse)

    sparse_change = torch.zeros(len(family), width)
    sparse_change[:, channels] = toward * diff[channels]  # (B, d_sparse): m_other - m_this on the chosen channels
    dense_change = sparse_change @ W.T  # (B, d_dense); linear, so the decoder bias cancels

    dense, dsites = pair.dense, pair.dense_sites
    sparse, ssites = pair.sparse, pair.sites
    base_dense = p_other(dense, dsites, batch)
    base_sparse = p_other(sparse, ssites, batch)

    def sweep(model, sites, at, change, base) -> dict:
        rows = [p_other(model, sites, batch, at, a * change) - base for a in alphas]
        means_ = [_by_family(r, family) for r in rows]
        return {"delta_p": [m for m, _ in means_], "delta_p_by_family": [[per[f] for _, per in means_] for f in (0, 1)],
                "p_other": [_by_family(base + r, family)[0] for r in rows]}

    dense_res = sweep(dense, dsites, dense_site, dense_change, base_dense)
    sparse_res = sweep(sparse, ssites, site, sparse_change, base_sparse)

    # Control: random residual channels at the same site, dense change scaled to the same norm per prompt.
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor([c for c in range(width) if c not in set(channels.tolist())])
    target_norm = dense_change.norm(dim=1, keepdim=True)  # (B, 1)
    draws, control_channels = [], []
    for _ in range(n_controls):
        R = pool[torch.randperm(len(pool), generator=gen)[: len(channels)]]
        step = toward * torch.where(diff[R] != 0, diff[R], torch.ones_like(diff[R]))  # (B, n)
        u = step @ W[:, R].T  # (B, d_dense)
        u = u * (target_norm / u.norm(dim=1, keepdim=True).clamp_min(1e-12))
        draws.append(sweep(dense, dsites, dense_site, u, base_dense)["delta_p"])
        control_channels.append(R.tolist())
    per_draw = torch.tensor(draws, dtype=torch.float64) if draws else torch.zeros(0, len(alphas), dtype=torch.float64)

    # Size of the change, against the dense residual itself at that site and position.
    with torch.no_grad(), dsites.record([dense_site]) as acts:
        dense(input_ids=batch.input_ids)
    resid_norm = float(_last(acts[dense_site], batch.lengths).float().norm(dim=1).mean())
    base_d_mean, base_d_fam = _by_family(base_dense, family)
    base_s_mean, base_s_fam = _by_family(base_sparse, family)
    return {
        "task": task.name,
        "completions": list(resolved.completions),
        "tokens": list(resolved.token_strings),
        "split": split,
        "examples": len(family),
        "examples_by_family": [int((family == f).sum()) for f in (0, 1)],
        "left_out": {"tokenization_contract": resolved.dropped, "longer_than_context": too_long},
        "alphas": alphas,
        "circuit_failed": (circuit.get("reason") or True) if circuit.get("failed") else False,
        "channel": {
            "bridge_site": site, "dense_site": dense_site, "channels": channels.tolist(),
            "node_ids": [list(c.node_ids) for c in chosen], "node_sites": [list(c.node_sites) for c in chosen],
            "mean_by_family": [[float(means[site][f, c.channel]) for f in (0, 1)] for c in chosen],
        },
        "candidates": [{"bridge_site": c.bridge_site, "channel": c.channel, "node_sites": list(c.node_sites),
                        "separation": separation(c)}
                       for c in scored[:20]],
        "dense_change_norm_at_alpha_1": float(target_norm.mean()),
        "dense_residual_norm": resid_norm,
        "dense": {"p_other_baseline": base_d_mean, "p_other_baseline_by_family": base_d_fam,
                  "task_accuracy": float(_by_family((base_dense < 0.5).float(), family)[0]), **dense_res},
        "sparse": {"p_other_baseline": base_s_mean, "p_other_baseline_by_family": base_s_fam,
                   "task_accuracy": float(_by_family((base_sparse < 0.5).float(), family)[0]), **sparse_res},
        "control": {"draws": n_controls, "channels": control_channels,
                    "delta_p": per_draw.mean(0).tolist() if n_controls else [],
                    "std": per_draw.std(0, unbiased=False).tolist() if n_controls else [],
                    "per_draw": per_draw.tolist()},
    }


def plot_intervention(result: dict, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["alphas"]
    ch = result["channel"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ctrl = result["control"]
    for k, row in enumerate(ctrl["per_draw"]):
        ax.plot(a, row, color="gray", lw=0.7, alpha=0.35, label="control draws" if k == 0 else None)
    if ctrl["delta_p"]:
        lo = [m - s for m, s in zip(ctrl["delta_p"], ctrl["std"])]
        hi = [m + s for m, s in zip(ctrl["delta_p"], ctrl["std"])]
        ax.fill_between(a, lo, hi, color="gray", alpha=0.2)
        ax.plot(a, ctrl["delta_p"], color="gray", lw=2, label=f"random channels (mean ± sd, {ctrl['draws']} draws)")
    ax.plot(a, result["dense"]["delta_p"], "o-", color="C0", lw=2,
            label=f"dense, via bridge ({ch['bridge_site']} -> {ch['dense_site']})")
    ax.plot(a, result["sparse"]["delta_p"], "s--", color="C1", lw=1.5, label="sparse model itself")
    ax.axhline(0, color="black", lw=0.6)
    comp = " / ".join(repr(c) for c in result["completions"])
    ax.set(xlabel="strength alpha (0: family mean, 1: the other family's mean)",
           ylabel="change of P(other family's completion)",
           title=f"{result['task']} ({comp}): {len(ch['channels'])} circuit channel"
                 f"{'s' if len(ch['channels']) > 1 else ''} at {ch['bridge_site']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)


def format_result(r: dict) -> str:
    ch = r["channel"]
    lines = [f"== intervention {r['task']}: channel(s) {ch['channels']} at sparse {ch['bridge_site']} -> dense "
             f"{ch['dense_site']} ({r['examples']} prompts; family means {ch['mean_by_family']})",
             f"   task accuracy: dense {r['dense']['task_accuracy']:.3f}, sparse {r['sparse']['task_accuracy']:.3f}; "
             f"|dense change| at alpha 1: {r['dense_change_norm_at_alpha_1']:.3g} "
             f"(|dense residual| {r['dense_residual_norm']:.3g})",
             f"   {'alpha':>6}{'dense dP':>11}{'control dP':>12}{'ctrl sd':>9}{'sparse dP':>11}"]
    ctrl = r["control"]
    for k, a in enumerate(r["alphas"]):
        c = f"{ctrl['delta_p'][k]:12.4f}{ctrl['std'][k]:9.4f}" if ctrl["delta_p"] else f"{'':>21}"
        lines.append(f"   {a:6.2f}{r['dense']['delta_p'][k]:11.4f}{c}{r['sparse']['delta_p'][k]:11.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# CLI


def add_intervene_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bridge", required=True, metavar="DIR", help="bridge folder (from `sparse-lm bridge`)")
    p.add_argument("--circuit", required=True, metavar="DIR", help="circuit folder with circuit.json (from the pruner)")
    p.add_argument("--task", required=True, help="the circuit's task (e.g. single_double_quote)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the circuit folder)")
    p.add_argument("--alphas", default=",".join(str(a) for a in DEFAULT_ALPHAS),
                   help="strengths: 0 = no change, 1 = the other family's mean (comma list)")
    p.add_argument("--channels", type=int, default=8,
                   help="circuit channels at the chosen site moved together (the best-separating ones; fewer when "
                        "the circuit has fewer there)")
    p.add_argument("--controls", type=int, default=8, help="random-channel control draws")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="task split of the prompts")
    p.add_argument("--examples", type=int, default=256, help="prompts (balanced over the two families)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the control draws")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


def run_intervene(args) -> int:
    from bridges.train import load_bridge
    from tasks import get_task

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    circuit = read_circuit(args.circuit)  # before the models load: a wrong path fails at once
    task = get_task(args.task)
    pair, tokenizer, _ = load_bridge(args.bridge, dev)
    alphas = [float(a) for a in str(args.alphas).split(",") if a.strip()]
    result = intervene(pair, tokenizer, task, circuit, alphas=alphas, n_channels=args.channels,
                       n_controls=args.controls, split=args.split, n_examples=args.examples, seed=args.seed)
    result["bridge"] = str(Path(args.bridge).resolve())
    result["circuit"] = str(Path(args.circuit).resolve())
    out = Path(args.out) if args.out else Path(args.circuit)
    if out.suffix == ".json":
        out = out.parent
    atomic_write_text(out / "intervention.json", json.dumps(result, indent=2) + "\n")
    plot_intervention(result, out / "intervention.png")
    if result["circuit_failed"]:
        print(f"warning: the pruner marked this circuit as failed ({result['circuit_failed']}); its channels may "
              f"not carry the task", file=sys.stderr)
    print(format_result(result))
    print(f"   -> {out / 'intervention.json'}, {out / 'intervention.png'}")
    return 0
