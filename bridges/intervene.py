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
2. Selection, on the task's ``select_split`` prompts (default ``train``): the
   sparse model runs on them and gives each circuit channel its two family
   means at the last prompt position. With ``select_by="effect"`` (default)
   each channel is then moved alone, inside the sparse model, from its family's
   mean to the other's, and the channel that raises the sparse model's own
   P(other family's completion) most picks the site; with ``"dense"`` each
   channel's move is carried through the decoder into the dense model instead,
   and the channel that raises the dense model's P(other) most on the selection
   prompts picks it (the score the experiment measures, on other prompts: a
   channel the sparse model reads need not be one the bridge carries); with ``"separation"`` the
   channel whose family means differ most does (in raw units, so it favours
   the sites where the residual is largest, and on the default run's bridged
   model it picked a channel whose move changed the sparse model's answer by
   -0.0007). Two moves are reported: ``single``, that one channel (the
   paper's picture), and ``multi``, the circuit's best channels (same score) at
   that site moved together (``--channels N``, default 8, fewer when the
   circuit has fewer there): a small model spreads the quote type over several
   residual channels, and one channel alone may barely move the task.
3. On the ``split`` prompts (default ``test``, never used for selection unless
   asked), for a prompt of family f the intervention moves the channels from
   the family mean of f toward the other family's: ``x_c += alpha (m_other -
   m_f)``. The decoder is linear, so the dense residual at the paired dense
   site changes by ``W_dec[:, c] alpha (m_other - m_f)`` (the bias cancels);
   that change is added at the last prompt position and the dense model runs on.
4. Reported over the sweep of ``alpha``, for each move: the change ΔP of the
   dense model's probability of the other family's completion (two-token
   softmax, averaged within and then over families), the same intervention
   inside the sparse model (reference), and a control: random residual
   channels of the same count at the same site, whose dense change is scaled
   to the same norm (``n_controls`` draws: mean and sd). ``effect_sd`` is
   ``(ΔP - control mean) / control sd`` and ``sign_ok`` whether ΔP > 0 (the
   move is toward the other family, so P(other) must rise), both at alpha 1.
   ``alpha = 0`` changes nothing, exactly.

A circuit.json with ``model_fingerprint`` must match the bridge's sparse model
(:func:`check_fingerprint`); one without it (an older file) is accepted with a
warning.

Writes ``intervention.json`` and ``intervention.png``.
"""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from sparse_lm.plots import save_png
from sparse_lm.sites import SiteRegistry

RESIDUAL_KINDS = ("attn.act_in", "attn.resid_delta", "mlp.act_in", "mlp.resid_delta", "resid_in", "resid_mid")
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
SELECT_BY = ("effect", "dense", "separation")
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


def _prompts(task, tokenizer, split: str, n_examples: int, seed: int, limit: int | None, device):
    """(batch on `device`, resolved task, prompts left out for being longer than `limit`) of one split."""
    from tasks.contract import resolve_task
    from tasks.loss import encode_examples

    resolved = resolve_task(task, tokenizer, task.examples(split, n_examples, seed))
    examples = resolved.examples
    if limit is not None:  # prompts longer than a model's context cannot be run: leave them out, and say so
        lengths = [len(ids) for ids in tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]]
        examples = [ex for ex, n in zip(examples, lengths) if n <= limit]
        if not examples:
            raise ValueError(f"every {split} prompt of task {task.name!r} is longer than the models' context "
                             f"({limit} tokens)")
    batch = encode_examples(tokenizer, examples, max_length=limit).to(device)
    if batch.family.unique().numel() < 2:
        raise ValueError(f"task {task.name!r} kept {split} prompts of one family only; cannot compare families")
    return batch, resolved, len(resolved.examples) - len(examples)


def check_fingerprint(circuit: dict, sparse) -> dict:
    """Refuse a circuit pruned from another model than the bridge's sparse model (``model_fingerprint`` in
    circuit.json); a circuit without the key (an older file) is accepted with a warning. Returns what was checked."""
    model_fingerprint = _fingerprint_function()
    recorded = circuit.get("model_fingerprint")
    actual = model_fingerprint(sparse)
    if recorded is None:
        print("warning: circuit.json has no model_fingerprint (an older file): cannot check that the circuit was "
              "pruned from this bridge's sparse model", file=sys.stderr)
        return {"circuit": None, "bridge_sparse": actual, "checked": False}
    if recorded != actual:
        raise ValueError(
            f"the circuit was pruned from another model (model_fingerprint {recorded}) than the bridge's sparse model "
            f"({actual}); prune the circuit from the bridge's own sparse model (a bridge that trains the sparse "
            f"model saves it in <bridge>/sparse_model) or pass the bridge made for the circuit's model")
    return {"circuit": recorded, "bridge_sparse": actual, "checked": True}


def _fingerprint_function():
    try:
        from sparse_lm.loading import model_fingerprint
    except ImportError:
        from sparse_lm.io import model_fingerprint  # where a later helper may put it
    return model_fingerprint


def _effect(delta_p: Sequence[float], control_mean: Sequence[float], control_sd: Sequence[float]) -> list[float | None]:
    """(dP - control mean) / control sd per alpha; None where the control does not vary (alpha 0)."""
    return [(d - m) / s if s > 1e-12 else None for d, m, s in zip(delta_p, control_mean, control_sd)]


def intervene(pair, tokenizer, task, circuit: dict, *, alphas: Sequence[float] = DEFAULT_ALPHAS, n_channels: int = 8,
              n_controls: int = 8, split: str = "test", select_split: str = "train", n_examples: int = 256,
              seed: int = 0, check_model: bool = True, eval_task=None, select_by: str = "effect",
              dense_single: bool = False, max_scored: int | None = 64) -> dict:
    """Run the sweep (see the module docstring); returns the JSON-able result.

    ``eval_task`` (default `task`) gives the ``split`` prompts ΔP is measured on, e.g. the same
    decision on real code (`tasks.real_code.code_quote_task`); selection always reads `task`.

    The site, the channels and the two family means are chosen on ``select_split`` prompts;
    ΔP is measured on ``split`` prompts (no selection on the evaluation data unless the two are
    equal, which the result records). ``result["single"]`` moves the best channel (the paper's
    picture), ``result["multi"]`` up to ``n_channels`` circuit channels at the same site; the
    top-level ``channel``/``dense``/``sparse``/``control``/``effect_sd``/``sign_ok`` repeat ``multi``. With
    ``dense_single`` (and another ``select_by``), ``result["single_dense"]`` also moves the one circuit channel
    whose edit, carried through the decoder, raises the dense model's P(other) most on the selection prompts.
    """
    from sparse_lm.arch import context_length, n_layers

    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    if 0.0 not in alphas:
        alphas = [0.0, *alphas]
    alphas = sorted(float(a) for a in alphas)
    if circuit.get("task") and circuit["task"] != task.name:
        raise ValueError(f"the circuit was found for task {circuit['task']!r}, not {task.name!r}")
    fingerprint = check_fingerprint(circuit, pair.sparse) if check_model else None
    contexts = [n for n in (context_length(pair.sparse), context_length(pair.dense)) if n]
    limit = min(contexts) if contexts else None
    device = next(pair.bridges.parameters()).device
    sel_batch, sel_resolved, sel_too_long = _prompts(task, tokenizer, select_split, n_examples, seed, limit, device)
    measured = task if eval_task is None else eval_task
    batch, resolved, too_long = _prompts(measured, tokenizer, split, n_examples, seed, limit, device)
    family = batch.family.cpu()

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

    # Selection: site, channels and family means from the selection split only.
    sites_needed = sorted({c.bridge_site for c in cands})
    means = family_means(pair.sparse, pair.sites, sel_batch, sites_needed)

    def separation(c: Candidate) -> float:
        m = means[c.bridge_site]  # (2, d_sparse)
        return abs(float(m[1, c.channel] - m[0, c.channel]))

    # A circuit of thousands of nodes has thousands of residual channels, and scoring one by its effect costs a
    # forward pass over the selection prompts: only the `max_scored` that separate the families most, relative
    # to the typical separation at their site (so no site wins by the scale of its residual), are scored.
    n_candidates = len(cands)
    if max_scored is not None and select_by != "separation" and n_candidates > max_scored:
        spread = {site: float((m[1] - m[0]).float().pow(2).mean().sqrt()) or 1.0 for site, m in means.items()}
        cands = sorted(cands, key=lambda c: separation(c) / spread[c.bridge_site], reverse=True)[:max_scored]

    sel_toward = (1 - 2 * sel_batch.family.cpu()).float()[:, None]  # (B_sel, 1), as `toward` below
    sel_family = sel_batch.family.cpu()
    sel_base = p_other(pair.sparse, pair.sites, sel_batch) if select_by == "effect" else None
    scores_dense = select_by == "dense" or dense_single
    sel_base_dense = p_other(pair.dense, pair.dense_sites, sel_batch) if scores_dense else None

    def moved_alone(site: str, channel: int) -> torch.Tensor:
        """(B_sel, d_sparse): the channel moved from each selection prompt's family mean to the other's."""
        m = means[site]
        change = torch.zeros(len(sel_toward), width)
        change[:, channel] = sel_toward[:, 0] * (m[1, channel] - m[0, channel])
        return change

    @functools.cache  # per (site, channel): several circuit nodes can share one residual channel
    def sparse_effect_at(site: str, channel: int) -> float:
        moved = p_other(pair.sparse, pair.sites, sel_batch, site, moved_alone(site, channel))
        return _by_family(moved - sel_base, sel_family)[0]

    @functools.cache
    def dense_effect_at(site: str, channel: int) -> float:
        j = sparse_index[site]
        W_c = pair.bridges.decoders[j].weight.detach().float().cpu()  # (d_dense, d_sparse)
        change = moved_alone(site, channel) @ W_c.T  # (B_sel, d_dense); linear, so the decoder bias cancels
        moved = p_other(pair.dense, pair.dense_sites, sel_batch, pair.pairs[j].dense, change)
        return _by_family(moved - sel_base_dense, sel_family)[0]

    def effect(c: Candidate) -> float:
        """ΔP(other) of the sparse model itself, on the selection prompts, with this channel moved alone."""
        return sparse_effect_at(c.bridge_site, c.channel)

    def dense_effect(c: Candidate) -> float:
        """ΔP(other) of the dense model, on the selection prompts, with this channel moved alone in the sparse
        residual and carried through the decoder (what the experiment measures, on other prompts)."""
        return dense_effect_at(c.bridge_site, c.channel)

    score = {"effect": effect, "separation": separation, "dense": dense_effect}[select_by]
    scored = sorted(cands, key=score, reverse=True)
    site = scored[0].bridge_site
    toward = (1 - 2 * family).float()[:, None]  # (B, 1): +1 moves family 0 toward 1, -1 moves family 1 toward 0

    dense, dsites = pair.dense, pair.dense_sites
    sparse, ssites = pair.sparse, pair.sites
    base_dense = p_other(dense, dsites, batch)
    base_sparse = p_other(sparse, ssites, batch)

    def sweep(model, sites, at, change, base) -> dict:
        rows = [p_other(model, sites, batch, at, a * change) - base for a in alphas]
        means_ = [_by_family(r, family) for r in rows]
        return {"delta_p": [m for m, _ in means_], "delta_p_by_family": [[per[f] for _, per in means_] for f in (0, 1)],
                "p_other": [_by_family(base + r, family)[0] for r in rows]}

    gen = torch.Generator().manual_seed(seed)
    head = alphas.index(1.0) if 1.0 in alphas else len(alphas) - 1  # the alpha of the headline numbers

    def experiment(chosen: list[Candidate]) -> dict:
        site = chosen[0].bridge_site  # every chosen channel is at one site
        i = sparse_index[site]
        dense_site = pair.pairs[i].dense
        diff = (means[site][1] - means[site][0]).float()  # (d_sparse,) selection mean on family 1 minus family 0
        W = pair.bridges.decoders[i].weight.detach().float().cpu()  # (d_dense, d_sparse)
        channels = torch.tensor([c.channel for c in chosen])
        sparse_change = torch.zeros(len(family), width)
        sparse_change[:, channels] = toward * diff[channels]  # (B, d_sparse): m_other - m_this on the chosen channels
        dense_change = sparse_change @ W.T  # (B, d_dense); linear, so the decoder bias cancels
        dense_res = sweep(dense, dsites, dense_site, dense_change, base_dense)
        sparse_res = sweep(sparse, ssites, site, sparse_change, base_sparse)
        # Control: random residual channels at the same site, dense change scaled to the same norm per prompt.
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
        ctrl_mean = per_draw.mean(0).tolist() if n_controls else []
        ctrl_sd = per_draw.std(0, unbiased=False).tolist() if n_controls else []
        effect = _effect(dense_res["delta_p"], ctrl_mean, ctrl_sd) if n_controls else []
        # Every move is toward the other family's mean, so P(other family's completion) should rise.
        sign_ok = [d > 0 for d in dense_res["delta_p"]]
        return {
            "channel": {
                "bridge_site": site, "dense_site": dense_site, "channels": channels.tolist(),
                "node_ids": [list(c.node_ids) for c in chosen], "node_sites": [list(c.node_sites) for c in chosen],
                "mean_by_family": [[float(means[site][f, c.channel]) for f in (0, 1)] for c in chosen],
            },
            "dense_change_norm_at_alpha_1": float(target_norm.mean()),
            "dense": dense_res, "sparse": sparse_res,
            "control": {"draws": n_controls, "channels": control_channels, "delta_p": ctrl_mean, "std": ctrl_sd,
                        "per_draw": per_draw.tolist()},
            "effect_alpha": alphas[head],
            "effect_sd": effect[head] if effect else None,
            "effect_sd_by_alpha": effect,
            "sign_ok": sign_ok[head],
            "sign_ok_by_alpha": [ok for a, ok in zip(alphas, sign_ok) if a > 0],
            "sparse_sign_ok": sparse_res["delta_p"][head] > 0,
        }

    multi_chosen = [c for c in scored if c.bridge_site == site][:n_channels]
    single = experiment(multi_chosen[:1])
    multi = experiment(multi_chosen)
    extra: dict[str, dict] = {}
    if dense_single and select_by != "dense":
        # Also the one channel whose edit the bridge carries best (scored on the selection prompts, like the rest).
        extra["single_dense"] = experiment([max(cands, key=dense_effect)])

    # Size of the change, against the dense residual itself at that site and position.
    dense_site = multi["channel"]["dense_site"]
    with torch.no_grad(), dsites.record([dense_site]) as acts:
        dense(input_ids=batch.input_ids)
    resid_norm = float(_last(acts[dense_site], batch.lengths).float().norm(dim=1).mean())
    base_d_mean, base_d_fam = _by_family(base_dense, family)
    base_s_mean, base_s_fam = _by_family(base_sparse, family)
    dense_base = {"p_other_baseline": base_d_mean, "p_other_baseline_by_family": base_d_fam,
                  "task_accuracy": float(_by_family((base_dense < 0.5).float(), family)[0])}
    sparse_base = {"p_other_baseline": base_s_mean, "p_other_baseline_by_family": base_s_fam,
                   "task_accuracy": float(_by_family((base_sparse < 0.5).float(), family)[0])}
    for part in (single, multi, *extra.values()):
        part["dense"] = {**dense_base, **part["dense"]}
        part["sparse"] = {**sparse_base, **part["sparse"]}
    return {
        "task": task.name,
        "completions": list(resolved.completions),
        "tokens": list(resolved.token_strings),
        "split": split,
        "select_split": select_split,
        "selected_on_evaluation_data": split == select_split and measured is task,
        "eval_task": measured.name,
        "examples": len(family),
        "examples_by_family": [int((family == f).sum()) for f in (0, 1)],
        "select_examples": len(sel_batch.lengths),
        "left_out": {"tokenization_contract": resolved.dropped, "longer_than_context": too_long},
        "select_left_out": {"tokenization_contract": sel_resolved.dropped, "longer_than_context": sel_too_long},
        "alphas": alphas,
        "circuit_failed": (circuit.get("reason") or True) if circuit.get("failed") else False,
        "model_fingerprint": fingerprint,
        "select_by": select_by,
        "candidates_total": n_candidates,
        "candidates_scored": len(cands),
        "candidates": [{"bridge_site": c.bridge_site, "channel": c.channel, "node_sites": list(c.node_sites),
                        "separation": separation(c),
                        **({"sparse_effect": effect(c)} if select_by == "effect" else {}),
                        **({"dense_effect": dense_effect(c)} if scores_dense else {})}
                       for c in scored[:20]],
        "dense_residual_norm": resid_norm,
        "single": single,
        "multi": multi,
        **extra,
        # The multi-channel result at the top level too (what readers of older files expect).
        **{k: multi[k] for k in ("channel", "dense_change_norm_at_alpha_1", "dense", "sparse", "control",
                                 "effect_sd", "sign_ok")},
    }


def plot_intervention(result: dict, out_png: str | Path) -> Path:
    """One panel per move: the single best channel (the paper's picture), the single channel the bridge carries
    best (when reported) and the multi-channel move, each with its random-channel control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["alphas"]
    parts = [(k, result[k]) for k in ("single", "single_dense", "multi") if k in result] or [("multi", result)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.5), sharey=True, squeeze=False)
    for ax, (name, r) in zip(axes[0], parts):
        ch = r["channel"]
        ctrl = r["control"]
        for k, row in enumerate(ctrl["per_draw"]):
            ax.plot(a, row, color="gray", lw=0.7, alpha=0.35, label="control draws" if k == 0 else None)
        if ctrl["delta_p"]:
            lo = [m - s for m, s in zip(ctrl["delta_p"], ctrl["std"])]
            hi = [m + s for m, s in zip(ctrl["delta_p"], ctrl["std"])]
            ax.fill_between(a, lo, hi, color="gray", alpha=0.2)
            ax.plot(a, ctrl["delta_p"], color="gray", lw=2, label=f"random channels (mean ± sd, {ctrl['draws']} draws)")
        ax.plot(a, r["dense"]["delta_p"], "o-", color="C0", lw=2,
                label=f"dense, via bridge ({ch['bridge_site']} -> {ch['dense_site']})")
        ax.plot(a, r["sparse"]["delta_p"], "s--", color="C1", lw=1.5, label="sparse model itself")
        ax.axhline(0, color="black", lw=0.6)
        eff = r.get("effect_sd")
        n = len(ch["channels"])
        ax.set(xlabel="strength alpha (0: family mean, 1: the other family's mean)",
               title=f"{name}: {n} channel{'s' if n > 1 else ''} at {ch['bridge_site']}"
                     + (f"; {eff:+.1f} sd at alpha {r['effect_alpha']:g}" if eff is not None else "")
                     + ("" if r.get("sign_ok", True) else " (wrong sign)"))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("change of P(other family's completion)")
    comp = " / ".join(repr(c) for c in result["completions"])
    fig.suptitle(f"{result['task']} ({comp}); chosen on {result.get('select_split', '?')}, "
                 f"measured on {result['split']} ({result['examples']} prompts)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out_png, dpi=120)


def _format_part(name: str, r: dict, alphas: Sequence[float]) -> list[str]:
    ch = r["channel"]
    eff = r.get("effect_sd")
    lines = [f"   [{name}] channel(s) {ch['channels']} at sparse {ch['bridge_site']} -> dense {ch['dense_site']}; "
             f"|dense change| at alpha 1: {r['dense_change_norm_at_alpha_1']:.3g}; at alpha {r['effect_alpha']:g}: "
             f"effect {'n/a' if eff is None else f'{eff:+.2f}'} control sd, sign "
             f"{'ok' if r['sign_ok'] else 'WRONG (P(other) fell)'}",
             f"   {'alpha':>6}{'dense dP':>11}{'control dP':>12}{'ctrl sd':>9}{'sparse dP':>11}"]
    ctrl = r["control"]
    for k, a in enumerate(alphas):
        c = f"{ctrl['delta_p'][k]:12.4f}{ctrl['std'][k]:9.4f}" if ctrl["delta_p"] else f"{'':>21}"
        lines.append(f"   {a:6.2f}{r['dense']['delta_p'][k]:11.4f}{c}{r['sparse']['delta_p'][k]:11.4f}")
    return lines


def format_result(r: dict) -> str:
    lines = [f"== intervention {r['task']}: chosen on {r.get('select_split', '?')} prompts, measured on "
             f"{r['examples']} {r['split']} prompts"
             + (f" of {r['eval_task']}" if r.get("eval_task", r["task"]) != r["task"] else "")
             + (" (WARNING: the same split: selection on the evaluation data)" if r.get("selected_on_evaluation_data")
                else ""),
             f"   task accuracy: dense {r['dense']['task_accuracy']:.3f}, sparse {r['sparse']['task_accuracy']:.3f}; "
             f"|dense residual| {r['dense_residual_norm']:.3g}"]
    for name in ("single", "single_dense", "multi"):
        if name in r:
            lines += _format_part(name, r[name], r["alphas"])
    return "\n".join(lines)
