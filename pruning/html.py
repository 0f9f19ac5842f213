"""A pruned circuit as one self-contained interactive HTML page.

`write_circuit_html(circuit, path)` turns the circuit dict the pruner writes
(``"format": "sparse-lm-circuit/1"``) into a page that works offline: inline
CSS, a small vanilla script and an SVG it draws, the circuit itself embedded as
JSON in ``<script type="application/json" id="circuit-data">``.

Python does the layout (which column each site gets, where each node sits) and
renders the header (task, metrics, verification, search curves); the script
only draws the graph from that layout and handles hovering. Layers run left to
right; inside a layer each site kind gets its own column in forward-pass order,
so a node's x position says where in the forward pass it lives. Nodes are
stacked by channel; edges are curves, blue for positive weights and red for
negative ones, as wide as their |weight|.

    sparse-lm circuit-html runs/x/circuit.json [runs/x/circuit.html]
"""

from __future__ import annotations

import json
import math
import os
import uuid
from html import escape
from pathlib import Path
from typing import Any

__all__ = ["KIND_ORDER", "circuit_layout", "render_circuit_html", "write_circuit_html"]

KIND_ORDER = (
    "resid_in",
    "attn.act_in",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.resid_delta",
    "resid_mid",
    "mlp.act_in",
    "mlp.post_act",
    "mlp.resid_delta",
)
"""Site kinds in forward order within a layer (``resid_*`` appear for dense models only)."""

NODE_COLOURS = {"attn": "#f4a259", "mlp": "#43aa8b", "other": "#9aa5b1"}
"""Fill of a node by the block it belongs to; edges use blue/red, so nodes avoid both."""
EDGE_COLOURS = {"positive": "#2b6cb0", "negative": "#d64545"}

# Layout constants, in SVG pixels.
_COL_WIDTH = 104  # a column that holds nodes
_EMPTY_COL_WIDTH = 24  # a candidate site with no node kept: a thin labelled slot
_LAYER_GAP = 30
_TOP = 124  # room for the layer label, the column labels and the vertical labels of empty columns
_ARC_ROOM = 60  # below the nodes, for edges that arc under the columns they skip
_GRAPH_HEIGHT = 560  # the tallest column is spread over about this much
_MARGIN = 16
_NO_LAYER = 10**6  # layer given to a site without a layer prefix: it sorts after every layer


# ----------------------------------------------------------------------------- data


def _plain(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays become Python values, NaN and inf become None
    (``JSON.parse`` rejects them)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _plain(obj.tolist())
    raise TypeError(f"cannot embed a {type(obj).__name__} in the circuit page: {obj!r:.80}")


def _embed_json(obj: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' survives, so snippet text such as
    ``</script><script>`` can neither end the element nor appear as markup."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _check(circuit: dict) -> None:
    fmt = circuit.get("format", "")
    if not str(fmt).startswith("sparse-lm-circuit/"):
        raise ValueError(f"not a circuit dict: format is {fmt!r}, expected 'sparse-lm-circuit/1'")
    ids = [n["id"] for n in circuit.get("nodes", [])]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"node ids must be unique; repeated: {dup[:10]}")
    known = set(ids)
    for k, e in enumerate(circuit.get("edges", [])):
        for end in ("src", "dst"):
            if e[end] not in known:
                raise ValueError(f"edge {k} has {end}={e[end]}, which is not among the {len(ids)} node ids")


def _site_parts(site: str) -> tuple[int, str]:
    """``"1.attn.v"`` -> ``(1, "attn.v")``; a site without a layer prefix sorts after every layer."""
    head, _, rest = site.partition(".")
    return (int(head), rest) if head.isdigit() and rest else (_NO_LAYER, site)


def _kind_rank(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind), "") if kind in KIND_ORDER else (len(KIND_ORDER), kind)


def _block(kind: str) -> str:
    return kind.split(".")[0] if kind.split(".")[0] in ("attn", "mlp") else "other"


# ----------------------------------------------------------------------------- layout


def circuit_layout(circuit: dict) -> dict:
    """Where everything goes: columns (one per site, forward order), layer bands, node centres,
    and the sizes that keep a large circuit readable (small nodes, thin faint edges)."""
    nodes, edges = circuit.get("nodes", []), circuit.get("edges", [])
    sites = set(circuit.get("node_sites", [])) | {n["site"] for n in nodes}
    order = sorted(sites, key=lambda s: (_site_parts(s)[0], _kind_rank(_site_parts(s)[1])))
    by_site: dict[str, list[dict]] = {s: [] for s in order}
    for n in nodes:
        by_site[n["site"]].append(n)

    tallest = max((len(v) for v in by_site.values()), default=0)
    spacing = min(30.0, max(7.0, _GRAPH_HEIGHT / max(tallest - 1, 1)))
    radius = min(7.0, max(2.5, spacing * 0.32))
    column_height = spacing * max(tallest - 1, 0)

    columns, layers, pos = [], [], {}
    x, filled = _MARGIN, 0  # filled: how many columns with nodes lie to the left
    for i, site in enumerate(order):
        layer, kind = _site_parts(site)
        if i and layer != _site_parts(order[i - 1])[0]:
            x += _LAYER_GAP
        if not layers or layers[-1]["layer"] != layer:
            layers.append({"layer": layer, "x0": x, "x1": x})
        members = sorted(by_site[site], key=lambda n: (n.get("channel") or 0, n["id"]))
        width = _COL_WIDTH if members else _EMPTY_COL_WIDTH
        cx = x + width / 2
        top = _TOP + (column_height - spacing * (len(members) - 1)) / 2  # centre short columns
        for j, n in enumerate(members):  # [x, y, index among the columns that hold nodes]
            pos[str(n["id"])] = [round(cx, 1), round(top + j * spacing, 1), filled]
        filled += bool(members)
        columns.append({"site": site, "layer": layer, "kind": kind, "x": round(cx, 1), "count": len(members)})
        x += width
        layers[-1]["x1"] = x

    n_edges = len(edges)
    return {
        "width": round(x + _MARGIN),
        "height": round(_TOP + column_height + _ARC_ROOM),
        "columns": columns,
        "layers": [{**b, "label": f"layer {b['layer']}" if b["layer"] != _NO_LAYER else "other"} for b in layers],
        "pos": pos,
        "radius": radius,
        "show_labels": spacing >= 13,
        "max_abs_weight": max((abs(e["weight"]) for e in edges if e["weight"] is not None), default=1.0) or 1.0,
        # Thousands of overlapping curves turn into a solid block unless they are thin and faint.
        "edge_width_max": 5.0 if n_edges <= 200 else 2.5 if n_edges <= 1000 else 1.5,
        "edge_opacity": 0.7 if n_edges <= 200 else 0.35 if n_edges <= 1000 else 0.18,
        "edge_colours": EDGE_COLOURS,
        "node_colours": {str(n["id"]): NODE_COLOURS[_block(n.get("kind") or _site_parts(n["site"])[1])]
                         for n in nodes},
    }


# ----------------------------------------------------------------------------- header


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return escape(str(v))
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return "—" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{100 * v:.1f}%"


def _verdict(ok: Any, yes: str, no: str) -> str:
    if ok is None:
        return '<span class="badge unknown">not checked</span>'
    return f'<span class="badge {"ok" if ok else "bad"}">{"✓ " + yes if ok else "✗ " + no}</span>'


def _metrics_table(c: dict) -> str:
    rows = [
        ("full_model", "full model", "the unpruned model"),
        ("circuit", "circuit", "only circuit nodes open, the rest mean-ablated"),
        ("circuit_calibrated", "circuit, calibrated", "circuit logits rescaled (see calibration)"),
        ("circuit_val", "circuit (validation)", "the circuit on the validation split, where its size was chosen"),
        ("circuit_calibrated_val", "calibrated (validation)", "the calibrated circuit on the validation split"),
        ("circuit_ablated", "circuit ablated", "circuit nodes mean-ablated, the rest open"),
        ("all_ablated", "all ablated", "every node mean-ablated"),
    ]
    metrics = c.get("metrics", {})
    target = c.get("target_loss")
    body = []
    for key, label, meaning in rows:
        if key not in metrics:
            continue
        m = metrics[key] or {}
        loss = m.get("loss")
        hit = key.startswith("circuit") and key != "circuit_ablated" and None not in (loss, target)
        cls = (' class="ok"' if loss <= target else ' class="bad"') if hit else ""
        body.append(f'<tr title="{escape(meaning)}"><th>{escape(label)}</th>'
                    f"<td{cls}>{_num(loss)}</td><td>{_pct(m.get('accuracy'))}</td></tr>")
    if not body:
        return "<p class=muted>no metrics recorded</p>"
    return ('<table class="metrics"><thead><tr><th></th><th>task loss</th><th>accuracy</th></tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def _chart(title: str, points: list, hline: float | None = None, hline_label: str = "") -> str:
    """A small inline SVG line chart of (x, y) points, with an optional dashed reference line."""
    pts = [(float(p[0]), float(p[1])) for p in points if p[0] is not None and p[1] is not None]
    if not pts:
        return ""
    w, h, pad = 260, 110, 44
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + ([hline] if hline is not None else [])
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda v: pad + (w - pad - 8) * ((v - x0) / (x1 - x0) if x1 > x0 else 0.5)  # noqa: E731
    sy = lambda v: h - 18 - (h - 30) * ((v - y0) / (y1 - y0) if y1 > y0 else 0.5)  # noqa: E731
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"/>' for x, y in pts) if len(pts) <= 40 else ""
    ref = ""
    if hline is not None:
        ref = (f'<line class="ref" x1="{pad}" x2="{w - 8}" y1="{sy(hline):.1f}" y2="{sy(hline):.1f}"/>'
               f'<text x="{pad + 4}" y="{sy(hline) - 3:.1f}">{escape(hline_label)}</text>')
    return (f'<figure class="chart"><figcaption>{escape(title)}</figcaption>'
            f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
            f'<line class="axis" x1="{pad}" y1="{h - 18}" x2="{w - 8}" y2="{h - 18}"/>'
            f'<line class="axis" x1="{pad}" y1="8" x2="{pad}" y2="{h - 18}"/>'
            f'<text x="{pad - 3}" y="{sy(y1) + 4:.1f}" text-anchor="end">{_tick(y1)}</text>'
            f'<text x="{pad - 3}" y="{sy(y0) + 4:.1f}" text-anchor="end">{_tick(y0)}</text>'
            f'<text x="{pad}" y="{h - 4}">{_tick(x0)}</text>'
            f'<text x="{w - 8}" y="{h - 4}" text-anchor="end">{_tick(x1)}</text>'
            f'{ref}<polyline points="{line}"/><g class="dots">{dots}</g></svg></figure>')


_SERIES_COLOURS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")


def _faithfulness_chart(c: dict) -> str:
    """Faithfulness against node budget (log scale) for every node order in ``faithfulness.by_order``."""
    faith = c.get("faithfulness") or {}
    by_order = faith.get("by_order") or ({c.get("method", "circuit"): faith} if faith.get("curve") else {})
    series = {}
    for name, entry in by_order.items():
        pts = [(float(p[0]), float(p[2])) for p in (entry or {}).get("curve") or []
               if len(p) >= 3 and p[0] is not None and p[2] is not None]
        if pts:
            series[str(name)] = (pts, (entry or {}).get("cpr"), (entry or {}).get("cmd"))
    if not series:
        return ""
    w, h, pad = 300, 130, 44
    lx = lambda n: math.log10(n + 1)  # noqa: E731  (budgets are log-spaced; 0 nodes sits at the left edge)
    xs = [lx(x) for pts, _, _ in series.values() for x, _ in pts]
    ys = [y for pts, _, _ in series.values() for _, y in pts] + [0.0, 1.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda v: pad + (w - pad - 8) * ((lx(v) - x0) / (x1 - x0) if x1 > x0 else 0.5)  # noqa: E731
    sy = lambda v: h - 18 - (h - 30) * ((v - y0) / (y1 - y0) if y1 > y0 else 0.5)  # noqa: E731
    lines, legend = [], []
    for i, (name, (pts, cpr, cmd)) in enumerate(series.items()):
        colour = _SERIES_COLOURS[i % len(_SERIES_COLOURS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        lines.append(f'<polyline style="stroke:{colour}" points="{line}"/>')
        legend.append(f'<span style="color:{colour}">■</span> {escape(name)}: CPR {_num(cpr, 3)}, CMD {_num(cmd, 3)}')
    refs = "".join(f'<line class="ref" x1="{pad}" x2="{w - 8}" y1="{sy(v):.1f}" y2="{sy(v):.1f}"/>' for v in (0.0, 1.0))
    count = c.get("num_nodes")
    mark = (f'<line class="axis" x1="{sx(count):.1f}" x2="{sx(count):.1f}" y1="8" y2="{h - 18}"/>'
            if isinstance(count, int) and not c.get("failed") else "")
    split = escape(str(faith.get("split", "test")))
    return (f'<figure class="chart faithfulness"><figcaption>faithfulness by node budget ({split} split; '
            f'1 = the model, 0 = every node ablated; grey line: this circuit)</figcaption>'
            f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
            f'<line class="axis" x1="{pad}" y1="{h - 18}" x2="{w - 8}" y2="{h - 18}"/>'
            f'<line class="axis" x1="{pad}" y1="8" x2="{pad}" y2="{h - 18}"/>{refs}{mark}'
            f'<text x="{pad - 3}" y="{sy(y1) + 4:.1f}" text-anchor="end">{_tick(y1)}</text>'
            f'<text x="{pad - 3}" y="{sy(y0) + 4:.1f}" text-anchor="end">{_tick(y0)}</text>'
            f'<text x="{pad}" y="{h - 4}">{_tick(10 ** x0 - 1)}</text>'
            f'<text x="{w - 8}" y="{h - 4}" text-anchor="end">{_tick(round(10 ** x1 - 1))} nodes (log)</text>'
            f'{"".join(lines)}</svg><div class="legend-small">{"<br>".join(legend)}</div></figure>')


def _search_section(c: dict) -> str:
    search = c.get("search") or {}
    curve = search.get("train_curve") or []
    target = c.get("target_loss")
    charts = [
        _chart("mask training: task loss by step", [(p[0], p[1]) for p in curve if len(p) >= 2],
               target, "target"),
        _chart("mask training: open nodes by step", [(p[0], p[2]) for p in curve if len(p) >= 3]),
        _chart("bisection: loss by node count", sorted(search.get("bisection") or []), target, "target"),
    ]
    charts = [ch for ch in charts if ch]
    seconds = search.get("seconds") or {}
    timing = " · ".join(f"{escape(str(k))} {_num(v, 3)} s" for k, v in seconds.items() if isinstance(v, (int, float)))
    hyper = c.get("hyperparameters") or {}
    rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(json.dumps(v))}</td></tr>" for k, v in hyper.items())
    return (f'<details class="search"><summary>search curves and hyperparameters</summary>'
            f'<div class="charts">{"".join(charts) or "<p class=muted>no search record</p>"}</div>'
            f'{f"<p class=muted>time: {timing}</p>" if timing else ""}'
            f'<table class="hyper">{rows}</table></details>')


def _header(c: dict) -> str:
    n_nodes, n_edges = len(c.get("nodes", [])), len(c.get("edges", []))
    all_edges = c.get("num_edges") if isinstance(c.get("num_edges"), int) else n_edges
    # num_edges counts weights only; the list also holds residual and q-k links (pruning.graph)
    links = c.get("num_edges_all_links") if isinstance(c.get("num_edges_all_links"), int) else all_edges
    edges_txt = f"<b>{all_edges}</b> edges" + (f" (+{links - all_edges} residual/q-k links)" if links > all_edges else "")
    edges_txt += f" ({n_edges} listed)" if n_edges < links else ""
    total = c.get("total_nodes")
    share = f" ({100 * n_nodes / total:.2g}%)" if isinstance(total, int) and total > 0 else ""
    ver = c.get("verification") or {}
    cal = c.get("calibration") or {}
    comp = c.get("completions") or []
    comp_txt = " vs ".join(f"<code>{escape(str(t))}</code>" for t in comp)
    facts = [
        ("model", f"{escape(str(c.get('model', '?')))} <span class=muted>({escape(str(c.get('model_type', '?')))}, "
                  f"{_num(c.get('n_layer'))} layers)</span>"),
        ("method", escape(str(c.get("method", "?")))),
        ("completions", comp_txt or "—"),
        ("circuit", f"<b>{n_nodes}</b> nodes of {_num(total)}{share} · {edges_txt}"),
        ("target loss", _num(c.get("target_loss"))),
        ("calibration", f"scale {_num(cal.get('scale'))} · shift {_num(cal.get('shift'))}" if cal else "—"),
    ]
    facts_html = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    verdicts = (_verdict(ver.get("keeps_target"), "circuit reaches the target loss", "circuit misses the target loss")
                + _verdict(ver.get("destroys_task"), "ablating the circuit destroys the task",
                           "the task survives ablating the circuit"))
    note = f'<p class="note">{escape(str(ver["note"]))}</p>' if ver.get("note") else ""
    failed = (f'<p class="failed">Pruning found no circuit: {escape(str(c.get("reason") or "no reason given"))}</p>'
              if c.get("failed") else "")
    return (f'<header><h1>Circuit for <code>{escape(str(c.get("task", "?")))}</code></h1>{failed}'
            f'<div class="panels"><table class="facts">{facts_html}</table>'
            f'<div>{_metrics_table(c)}<div class="verdicts">{verdicts}</div>{note}</div>{_faithfulness_chart(c)}</div>'
            f"{_search_section(c)}</header>")


def _legend() -> str:
    sw = "".join(f'<span><i class="dot" style="background:{col}"></i>{name}</span>'
                 for name, col in (("attention site", NODE_COLOURS["attn"]), ("MLP site", NODE_COLOURS["mlp"]),
                                   ("residual site", NODE_COLOURS["other"])))
    ed = "".join(f'<span><i class="bar" style="background:{col}"></i>{name} weight</span>'
                 for name, col in EDGE_COLOURS.items())
    return (f'<div class="legend">{sw}{ed}<span class="muted">hover a node or an edge for details; '
            f"click a node to pin its card</span></div>")


# ----------------------------------------------------------------------------- page

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1f2933; background: #fff; }
header { padding: 10px 18px 4px; border-bottom: 1px solid #e4e7eb; }
h1 { font-size: 19px; margin: 0 0 6px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
code { background: #f0f2f5; padding: 0 4px; border-radius: 3px; }
.panels { display: flex; gap: 32px; flex-wrap: wrap; align-items: flex-start; }
table { border-collapse: collapse; }
th, td { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
.facts th { color: #616e7c; font-weight: normal; }
.metrics td, .metrics thead th { text-align: right; font-variant-numeric: tabular-nums; }
.metrics thead th { color: #616e7c; font-weight: normal; }
.metrics tbody tr { border-top: 1px solid #eef0f3; }
td.ok { color: #17803d; font-weight: 600; } td.bad { color: #b42318; font-weight: 600; }
.verdicts { margin-top: 6px; display: flex; gap: 8px; flex-wrap: wrap; }
.badge { padding: 1px 8px; border-radius: 10px; font-size: 13px; }
.badge.ok { background: #dcf5e3; color: #17803d; } .badge.bad { background: #fde4e1; color: #b42318; }
.badge.unknown { background: #eef0f3; color: #616e7c; }
.note { margin: 4px 0; color: #52606d; max-width: 560px; font-size: 13px; }
.muted { color: #7b8794; }
details.search { margin: 6px 0; } details.search summary { cursor: pointer; color: #3e4c59; }
.charts { display: flex; gap: 18px; flex-wrap: wrap; }
figure.chart { margin: 4px 0; } figcaption { font-size: 12px; color: #52606d; }
figure.chart text { font-size: 10px; fill: #7b8794; }
figure.chart polyline { fill: none; stroke: #2b6cb0; stroke-width: 1.5; }
figure.chart .dots { fill: #2b6cb0; }
figure.chart .legend-small { font-size: 11px; color: #52606d; }
figure.chart .axis { stroke: #cbd2d9; } figure.chart .ref { stroke: #b42318; stroke-dasharray: 4 3; }
.hyper { font-size: 12px; margin-top: 4px; } .hyper th { color: #616e7c; font-weight: normal; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; padding: 6px 18px; font-size: 13px; }
.legend i { display: inline-block; margin-right: 5px; vertical-align: middle; }
.legend .dot { width: 11px; height: 11px; border-radius: 50%; border: 1px solid #333; }
.legend .bar { width: 18px; height: 4px; }
#graph { overflow: auto; padding: 0 0 12px; }
#graph .empty { padding: 30px 18px; color: #7b8794; font-size: 16px; }
svg#circuit text { font-size: 11px; fill: #52606d; }
svg#circuit .layer-band { fill: #f5f7fa; }
svg#circuit .layer-label { font-size: 13px; font-weight: 600; fill: #323f4b; }
svg#circuit .empty-col { fill: #b8c2cc; font-size: 10px; }
svg#circuit .edge { fill: none; }
svg#circuit .hit { fill: none; stroke: transparent; stroke-width: 7; }
svg#circuit .node { stroke: #323f4b; stroke-width: 1; cursor: pointer; }
svg#circuit .chan { font-size: 9.5px; fill: #323f4b; paint-order: stroke; stroke: #fff; stroke-width: 3px;
  pointer-events: none; }
svg#circuit.focus .edge { opacity: 0.05; } svg#circuit.focus .edge.hot { opacity: 1; }
svg#circuit.focus .node { opacity: 0.25; } svg#circuit.focus .node.hot { opacity: 1; stroke-width: 2; }
#tip { position: fixed; display: none; z-index: 10; max-width: 520px; max-height: 70vh; overflow: auto;
  background: #fff; border: 1px solid #9aa5b1; border-radius: 6px; padding: 8px 10px;
  box-shadow: 0 4px 14px rgba(0,0,0,.18); font-size: 13px; pointer-events: none; }
#tip.pinned { pointer-events: auto; border-color: #323f4b; }
#tip h2 { font-size: 14px; margin: 0 0 4px; } #tip h3 { font-size: 12px; margin: 8px 0 0; color: #52606d; }
#tip table td { font-variant-numeric: tabular-nums; }
#tip pre { margin: 3px 0; padding: 4px 6px; background: #f5f7fa; border-left: 3px solid #43aa8b;
  white-space: pre; overflow-x: auto; font-size: 12px; }
#tip .act { color: #616e7c; font-size: 12px; }
#tip mark { background: #ffe08a; border-radius: 2px; }
#tip mark:empty { display: none; }
.failed { background: #fde4e1; color: #b42318; padding: 4px 10px; border-radius: 4px; margin: 4px 0 8px; }
"""

# The graph is drawn from the embedded circuit and layout. Data text only ever reaches the page
# through textContent, never innerHTML, so snippets of code cannot inject markup.
_JS = r"""
(function () {
  "use strict";
  // An uncaught error is recorded on the body element, where a headless check (--dump-dom) can read it.
  window.addEventListener("error", function (e) { document.body.dataset.jsError = String(e.message); });
  var C = JSON.parse(document.getElementById("circuit-data").textContent);
  var L = JSON.parse(document.getElementById("circuit-layout").textContent);
  var SVG_NS = "http://www.w3.org/2000/svg";  // a namespace name, not a resource: nothing is fetched
  var graph = document.getElementById("graph"), tip = document.getElementById("tip");
  var nodes = {}, edgesOf = {}, pinned = null, svg = null;
  C.nodes.forEach(function (n) { nodes[n.id] = n; edgesOf[n.id] = []; });

  function svgEl(tag, attrs, parent, text) {
    var el = document.createElementNS(SVG_NS, tag);
    for (var k in attrs) el.setAttribute(k, attrs[k]);
    if (text !== undefined) el.textContent = text;
    parent.appendChild(el);
    return el;
  }
  function htmlEl(tag, text, parent, cls) {
    var el = document.createElement(tag);
    if (text !== undefined && text !== null) el.textContent = text;
    if (cls) el.className = cls;
    parent.appendChild(el);
    return el;
  }
  function fmt(v) {  // 4 significant digits, trailing zeros after the point dropped
    if (v === null || v === undefined) return "—";
    var s = (+v).toPrecision(4);
    return s.indexOf(".") >= 0 && s.indexOf("e") < 0 ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  }
  function name(n) { return n.site + " #" + n.channel; }

  if (!C.nodes.length) {
    htmlEl("div", "The circuit is empty: no node was kept.", graph, "empty");
  } else {
    svg = svgEl("svg", {id: "circuit", width: L.width, height: L.height}, graph);
    L.layers.forEach(function (b) {
      svgEl("rect", {"class": "layer-band", x: b.x0 - 6, y: 4, width: b.x1 - b.x0 + 12, height: L.height - 8, rx: 6},
        svg);
      svgEl("text", {"class": "layer-label", x: (b.x0 + b.x1) / 2, y: 22, "text-anchor": "middle"}, svg, b.label);
    });
    L.columns.forEach(function (c) {
      if (c.count) {
        svgEl("text", {x: c.x, y: 88, "text-anchor": "middle"}, svg, c.kind);
        svgEl("text", {x: c.x, y: 102, "text-anchor": "middle"}, svg, c.count + (c.count > 1 ? " nodes" : " node"));
      } else {  // a candidate site where nothing was kept: a thin slot, its name written bottom-up
        var turn = "rotate(-90 " + (c.x + 3) + " 104)";
        var t = svgEl("text", {"class": "empty-col", x: c.x + 3, y: 104, transform: turn}, svg, c.kind);
        svgEl("title", {}, t, c.site + ": no node kept");
      }
    });

    // Edges: weakest first so strong ones end up on top; each gets a wide invisible twin for hovering.
    var eg = svgEl("g", {}, svg);
    var byStrength = C.edges.slice().sort(function (a, b) { return Math.abs(a.weight) - Math.abs(b.weight); });
    byStrength.forEach(function (e) {
      var p = L.pos[e.src], q = L.pos[e.dst];  // [x, y, index of the column among those holding nodes]
      var x0 = p[0] + L.radius, x1 = q[0] - L.radius, dx = Math.max(Math.abs(x1 - x0) / 2, 30);
      // An edge that jumps over columns holding nodes dips below the straight line so that it does not run
      // through their nodes; the further the jump, the deeper (up to ~50px, room the layout leaves below).
      var dip = Math.max(0, Math.min(24 * (q[2] - p[2] - 1), 66));  // control points; the curve dips ~3/4 of it
      var d = "M" + x0 + "," + p[1] + " C" + (x0 + dx) + "," + (p[1] + dip) + " " +
        (x1 - dx) + "," + (q[1] + dip) + " " + x1 + "," + q[1];
      var width = 0.6 + (L.edge_width_max - 0.6) * Math.abs(e.weight) / L.max_abs_weight;
      var path = svgEl("path", {"class": "edge", d: d, opacity: L.edge_opacity, "stroke-width": width.toFixed(2),
        stroke: e.weight >= 0 ? L.edge_colours.positive : L.edge_colours.negative}, eg);
      path.ends = [e.src, e.dst];
      svgEl("path", {"class": "hit", d: d}, eg).edge = e;
      edgesOf[e.src].push(path); edgesOf[e.dst].push(path);
    });

    var ng = svgEl("g", {}, svg);
    C.nodes.forEach(function (n) {
      var p = L.pos[n.id], r = L.radius;
      n.el = svgEl("circle", {"class": "node", "data-node": n.id, cx: p[0], cy: p[1], r: r, fill: L.node_colours[n.id]},
        ng);
      if (L.show_labels) svgEl("text", {"class": "chan", x: p[0] + r + 2, y: p[1] - r + 1}, ng, n.channel);
    });

    // One set of listeners on the whole drawing (thousands of edges would otherwise need their own).
    svg.addEventListener("mouseover", function (ev) {
      if (pinned !== null) return;
      if (ev.target.dataset && ev.target.dataset.node !== undefined) showNode(nodes[ev.target.dataset.node], ev);
      else if (ev.target.edge) showEdge(ev.target.edge, ev);
    });
    svg.addEventListener("mouseout", function () { if (pinned === null) clear(); });
    svg.addEventListener("mousemove", function (ev) { if (pinned === null) place(ev); });
    svg.addEventListener("click", function (ev) {  // a click on a node pins its card, anywhere else unpins
      var id = ev.target.dataset ? ev.target.dataset.node : undefined;
      clear();
      if (id !== undefined) pin(nodes[id], ev);
    });
    document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") clear(); });
    // A link such as circuit.html#node=12 opens with that node's card pinned.
    var m = /node=(-?\d+)/.exec(location.hash);
    if (m && nodes[m[1]]) {
      var box = nodes[m[1]].el.getBoundingClientRect();
      pin(nodes[m[1]], {clientX: box.right, clientY: box.bottom});
    }
  }

  function pin(n, ev) { showNode(n, ev); pinned = n.id; tip.classList.add("pinned"); }
  function clear() {
    pinned = null;
    tip.style.display = "none"; tip.classList.remove("pinned");
    svg.classList.remove("focus");
    svg.querySelectorAll(".hot").forEach(function (el) { el.classList.remove("hot"); });
  }
  function place(ev) {  // next to the pointer, kept inside the window
    var pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
    var x = ev.clientX + pad, y = ev.clientY + pad;
    if (x + w > window.innerWidth) x = Math.max(0, ev.clientX - w - pad);
    if (y + h > window.innerHeight) y = Math.max(0, window.innerHeight - h - 4);
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  function row(table, label, value) {
    var tr = htmlEl("tr", null, table);
    htmlEl("th", label, tr); htmlEl("td", value, tr);
  }
  function showNode(n, ev) {  // the card, and the node with its edges and neighbours lit, the rest faded
    svg.classList.add("focus"); n.el.classList.add("hot");
    edgesOf[n.id].forEach(function (p) {
      p.classList.add("hot");
      p.ends.forEach(function (id) { nodes[id].el.classList.add("hot"); });
    });
    tip.textContent = "";
    htmlEl("h2", name(n), tip);
    var t = htmlEl("table", null, tip);
    row(t, "tau / score", fmt(n.tau) + " / " + fmt(n.score));
    row(t, "mean activation", fmt(n.mean));
    var comp = C.completions || ["?", "?"];
    (n.mean_by_family || []).forEach(function (v, i) {  // completions holding whitespace are shown quoted
      var tok = /^\S+$/.test(comp[i]) ? comp[i] : JSON.stringify(comp[i]);
      row(t, "mean, family " + i + " (→ " + tok + ")", fmt(v));
    });
    row(t, "edges", edgesOf[n.id].length);
    var snippets = n.snippets || [];
    if (snippets.length) htmlEl("h3", "top-activating snippets", tip);
    snippets.forEach(function (s) {
      htmlEl("div", "activation " + fmt(s.activation), tip, "act");
      // Text nodes only: code is shown as written, never parsed as markup. text[start:end] (Python
      // indices, i.e. code points, hence Array.from) is the token at the maximum: it gets a <mark>.
      var pre = htmlEl("pre", null, tip), chars = Array.from(s.text || ""), h = s.highlight;
      if (!h || h.length !== 2 || !(h[0] < h[1])) h = [chars.length, chars.length];
      htmlEl("span", chars.slice(0, h[0]).join(""), pre);
      htmlEl("mark", chars.slice(h[0], h[1]).join(""), pre);
      htmlEl("span", chars.slice(h[1]).join(""), pre);
    });
    tip.style.display = "block"; place(ev);
  }
  function showEdge(e, ev) {
    tip.textContent = "";
    htmlEl("h2", name(nodes[e.src]) + " → " + name(nodes[e.dst]), tip);
    htmlEl("div", "weight " + (e.weight >= 0 ? "+" : "") + fmt(e.weight), tip);
    tip.style.display = "block"; place(ev);
  }
  document.body.dataset.status = "ready";
})();
"""


def render_circuit_html(circuit: dict) -> str:
    """The page as a string (see the module docstring)."""
    _check(circuit)
    data = _plain(circuit)
    layout = circuit_layout(data)
    title = f"circuit · {data.get('task', '?')} · {data.get('model', '?')}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"{_header(data)}\n{_legend()}\n<div id=\"graph\"></div><div id=\"tip\"></div>\n"
        "<noscript><p>The graph needs JavaScript; the circuit is embedded below as JSON.</p></noscript>\n"
        f'<script type="application/json" id="circuit-data">{_embed_json(data)}</script>\n'
        f'<script type="application/json" id="circuit-layout">{_embed_json(layout)}</script>\n'
        f"<script>{_JS}</script>\n</body></html>\n"
    )


def write_circuit_html(circuit: dict, out_path: str | os.PathLike) -> Path:
    """Write the page atomically (a temporary file in the same folder, then a rename) and return its path."""
    out = Path(out_path)
    text = render_circuit_html(circuit)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: rename is atomic
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
