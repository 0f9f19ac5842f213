"""The circuit page: self-contained, escaped, and drawn for real by headless Chromium.

The Chromium tests need the Debian package ``chromium`` (``apt-get install -y chromium``); without
it they fail rather than skip, so that CI cannot silently stop looking at the page.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pruning.html import KIND_ORDER, NODE_COLOURS, EDGE_COLOURS, circuit_layout, render_circuit_html, write_circuit_html

# Snippet text that would run or break the page if it reached the markup unescaped.
INJECTION = "<script>alert(1)</script><img src=x onerror=\"document.body.dataset.pwned='yes'\">"


def example_circuit() -> dict:
    """A small circuit as the pruner writes it: 2 layers, 12 nodes, 9 edges, code snippets full of
    '<', '>', '&' and quotes, and whitespace that must survive (indentation, a tab, newlines)."""
    sites = [f"{layer}.{kind}" for layer in range(2) for kind in KIND_ORDER if not kind.startswith("resid")]
    spec = [  # (site, channel, mean on family 0, mean on family 1)
        ("0.attn.act_in", 3, 0.9, 0.1), ("0.attn.act_in", 41, -0.2, 0.7),
        ("0.attn.k", 7, 0.5, 0.5), ("0.attn.v", 12, 1.1, -0.3), ("0.attn.v", 2, 0.2, 0.9),
        ("0.attn.resid_delta", 19, 0.8, -0.8), ("0.mlp.post_act", 250, 2.0, 0.0),
        ("1.attn.q", 5, 0.4, 0.3), ("1.attn.k", 33, 0.6, 0.1), ("1.attn.v", 12, 0.3, 1.2),
        ("1.mlp.post_act", 101, 0.0, 1.7), ("1.mlp.resid_delta", 8, 1.5, -1.5),
    ]
    snippets = [
        {"text": "x = 'a' & b\n    return \"<b>\"", "activation": 3.25, "token": "'", "highlight": [4, 5]},
        {"text": f"# {INJECTION}", "activation": 2.5, "token": "<", "highlight": [2, 3]},
        {"text": "if a < b and c > d:\n\tpass", "activation": 1.75, "token": " <", "highlight": [4, 6]},
    ]
    nodes = []
    for i, (site, channel, m0, m1) in enumerate(spec):
        layer, kind = site.split(".", 1)
        nodes.append({"id": i, "site": site, "layer": int(layer), "kind": kind, "channel": channel,
                      "tau": round(0.1 * i, 3), "score": round(1.0 - 0.05 * i, 3), "mean": (m0 + m1) / 2,
                      "mean_by_family": [m0, m1], "snippets": snippets if i % 2 == 0 else snippets[:1]})
    edges = [(0, 2, 0.8), (1, 3, -0.5), (3, 5, 1.2), (4, 5, -0.9), (5, 6, 0.3),
             (6, 8, 0.7), (5, 9, -0.4), (9, 11, 1.0), (10, 11, -1.3)]
    return {
        "format": "sparse-lm-circuit/1", "model": "runs/tiny", "model_type": "sparse_gpt",
        "task": "single_double_quote", "method": "learned", "target_loss": 0.15, "n_layer": 2,
        "node_sites": sites, "total_nodes": 2 * (4 * 64 + 3 * 64 + 256),
        "nodes": nodes,
        "edges": [{"src": s, "dst": d, "weight": w} for s, d, w in edges],
        "num_nodes": len(nodes), "num_edges": len(edges),
        "metrics": {
            "full_model": {"loss": 0.081, "accuracy": 0.98},
            "circuit": {"loss": 0.142, "accuracy": 0.95},
            "circuit_calibrated": {"loss": 0.118, "accuracy": 0.96},
            "circuit_ablated": {"loss": 1.93, "accuracy": 0.41},
            "all_ablated": {"loss": 2.41, "accuracy": 0.5},
        },
        "verification": {"keeps_target": True, "destroys_task": True,
                         "note": "circuit loss 0.142 <= target 0.15; ablating it gives 1.93 (chance 0.69)"},
        "calibration": {"scale": 1.37, "shift": 0.0},
        "search": {"bisection": [[40, 0.09], [20, 0.11], [12, 0.142], [8, 0.31], [10, 0.2]],
                   "train_curve": [[s, 0.6 * 0.9 ** (s / 50) + 0.1, int(1100 * 0.97 ** (s / 10)) + 12]
                                   for s in range(0, 1001, 50)]},
        "hyperparameters": {"lr": 0.01, "steps": 1000, "k_coef": 1e-3, "init_noise": 0.05},
        "completions": ["'", '"'], "target_tokens": [6, 1],
    }


def large_circuit(n_nodes: int = 400, n_edges: int = 3000, seed: int = 0) -> dict:
    """Hundreds of nodes and thousands of edges between them, always from an earlier site to a later one."""
    rng = random.Random(seed)
    c = example_circuit()
    c["n_layer"] = 4
    c["node_sites"] = [f"{layer}.{kind}" for layer in range(4) for kind in KIND_ORDER if not kind.startswith("resid")]
    order = {s: i for i, s in enumerate(c["node_sites"])}
    nodes = []
    for i in range(n_nodes):
        site = rng.choice(c["node_sites"])
        layer, kind = site.split(".", 1)
        nodes.append({"id": i, "site": site, "layer": int(layer), "kind": kind, "channel": rng.randrange(1024),
                      "tau": None, "score": rng.random(), "mean": rng.gauss(0, 1),
                      "mean_by_family": [rng.gauss(0, 1), rng.gauss(0, 1)],
                      "snippets": [{"text": "def f(x):\n    return x <= 1", "activation": 1.0}]})
    edges = []
    while len(edges) < n_edges:
        a, b = rng.sample(nodes, 2)
        if order[a["site"]] < order[b["site"]]:
            edges.append({"src": a["id"], "dst": b["id"], "weight": rng.gauss(0, 1)})
    c.update(nodes=nodes, edges=edges, num_nodes=n_nodes, num_edges=n_edges, method="attribution")
    return c


def empty_circuit() -> dict:
    c = example_circuit()
    c.update(nodes=[], edges=[], num_nodes=0, num_edges=0)
    c["verification"] = {"keeps_target": False, "destroys_task": None, "note": "nothing survived pruning"}
    c.update(failed=True, reason="the full model misses the target loss (0.081 > 0.05)")
    return c


# ----------------------------------------------------------------------------- markup


class _Markup(HTMLParser):
    """Collects every src/href value and the text of every <script> element."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.scripts: list[tuple[dict, str]] = []
        self._in_script: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [v or "" for k, v in attrs.items() if k in ("src", "href")]
        if tag == "script":
            self._in_script = attrs
            self.scripts.append((attrs, ""))

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None


def test_page_is_self_contained_and_embeds_the_circuit():
    circuit = example_circuit()
    page = render_circuit_html(circuit)
    markup = _Markup()
    markup.feed(page)

    assert not [u for u in markup.links if re.match(r"\s*(https?:)?//", u)], markup.links
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?(https?:)?//", page), "the page loads a resource"
    # Exactly our three scripts: snippet text could not open or close one.
    assert [a.get("type") for a, _ in markup.scripts] == ["application/json", "application/json", None]
    data = {a.get("id"): text for a, text in markup.scripts}
    assert json.loads(data["circuit-data"]) == circuit
    assert set(json.loads(data["circuit-layout"])["pos"]) == {str(n["id"]) for n in circuit["nodes"]}
    assert "<script>alert" not in page and "<img" not in page
    assert "return \\\"<b>" not in page and "\\u003cscript\\u003ealert" in page
    assert "single_double_quote" in page and "sparse_gpt" in page  # the header is rendered without JS


def test_non_finite_numbers_are_embedded_as_null():
    circuit = example_circuit()
    circuit["nodes"][0]["tau"] = float("nan")
    circuit["metrics"]["all_ablated"]["loss"] = float("inf")
    page = render_circuit_html(circuit)
    embedded = re.search(r'id="circuit-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(embedded)
    assert data["nodes"][0]["tau"] is None and data["metrics"]["all_ablated"]["loss"] is None


def test_a_bare_circuit_renders_and_numpy_values_are_embedded():
    """Only the format, nodes and edges are required; metrics, search and the rest may be missing."""
    bare = {"format": "sparse-lm-circuit/1", "edges": [{"src": 0, "dst": 1, "weight": np.float32(-0.5)}],
            "nodes": [{"id": 0, "site": "0.attn.q", "channel": np.int64(4)}, {"id": 1, "site": "0.mlp.post_act",
                                                                          "channel": 9}]}
    page = render_circuit_html(bare)
    data = json.loads(re.search(r'id="circuit-data">(.*?)</script>', page, re.S).group(1))
    assert data["edges"][0]["weight"] == -0.5 and data["nodes"][0]["channel"] == 4
    assert "no metrics recorded" in page


def test_layout_follows_the_forward_pass():
    circuit = example_circuit()
    layout = circuit_layout(circuit)
    cols = layout["columns"]
    assert [c["site"] for c in cols] == circuit["node_sites"]  # layer by layer, kinds in forward order
    assert all(a["x"] < b["x"] for a, b in zip(cols, cols[1:]))
    x_of = {c["site"]: c["x"] for c in cols}
    for n in circuit["nodes"]:
        assert layout["pos"][str(n["id"])][0] == x_of[n["site"]]
    v = sorted((n for n in circuit["nodes"] if n["site"] == "0.attn.v"), key=lambda n: n["channel"])
    assert layout["pos"][str(v[0]["id"])][1] < layout["pos"][str(v[1]["id"])][1]  # stacked by channel
    for e in circuit["edges"]:  # every edge of this circuit runs forward
        assert layout["pos"][str(e["src"])][0] < layout["pos"][str(e["dst"])][0]


def test_write_is_atomic_and_checks_the_circuit(tmp_path):
    out = write_circuit_html(example_circuit(), tmp_path / "sub" / "circuit.html")
    assert out == tmp_path / "sub" / "circuit.html" and out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    write_circuit_html(empty_circuit(), out)  # overwrite in place
    assert [p.name for p in out.parent.iterdir()] == ["circuit.html"]  # no temporary file left behind

    bad = example_circuit()
    bad["edges"].append({"src": 3, "dst": 99, "weight": 1.0})
    with pytest.raises(ValueError, match="dst=99"):
        write_circuit_html(bad, tmp_path / "bad.html")
    assert not (tmp_path / "bad.html").exists()
    with pytest.raises(ValueError, match="format"):
        render_circuit_html({"nodes": []})


# ----------------------------------------------------------------------------- headless Chromium


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and (path := shutil.which(name)):
            return path
    pytest.fail("no Chromium found (tried chromium, chromium-browser, google-chrome): "
                "the page is checked in a real browser; install it with `apt-get install -y chromium`")


def run_chromium(page: Path, tmp_path: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,900",
           "--virtual-time-budget=2000", *args, page.resolve().as_uri() + fragment]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def dump_dom(page: Path, tmp_path: Path, fragment: str = "") -> str:
    dom = run_chromium(page, tmp_path, "--dump-dom", fragment=fragment).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert "data-js-error" not in body, f"the page's script failed: {body}"
    assert 'data-status="ready"' in body, f"the page's script did not finish: {body}"
    assert "pwned" not in body, "snippet text was executed as markup"
    return dom


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def _has_colour(pixels: np.ndarray, hex_colour: str, tol: int = 6) -> int:
    return int((np.abs(pixels.astype(int) - _rgb(hex_colour)).max(axis=-1) <= tol).sum())


def test_chromium_draws_the_graph(tmp_path):
    circuit = example_circuit()
    page = write_circuit_html(circuit, tmp_path / "circuit.html")
    dom = dump_dom(page, tmp_path)
    assert len(re.findall(r"<circle [^>]*data-node=", dom)) == len(circuit["nodes"])
    assert len(re.findall(r'<path class="edge"', dom)) == len(circuit["edges"])

    # With a node's card pinned (page#node=ID) its snippets are in the DOM as text, escaped, whitespace kept.
    dom = dump_dom(page, tmp_path, fragment="#node=0")
    card = re.search(r'<div id="tip"[^>]*>(.*?)</div>\s*<noscript>', dom, re.S).group(1)
    assert "0.attn.act_in #3" in card
    assert "<span># </span><mark>&lt;</mark><span>script&gt;alert(1)&lt;/script&gt;&lt;img src=x" in card
    assert "<span>x = </span><mark>'</mark><span>a' &amp; b\n    return \"&lt;b&gt;\"</span>" in card
    assert "\tpass" in card
    assert "(→ ')" in card and '(→ ")' in card


def test_chromium_screenshot_is_not_blank(tmp_path):
    from PIL import Image

    page = write_circuit_html(example_circuit(), tmp_path / "circuit.html")
    png = tmp_path / "circuit.png"
    run_chromium(page, tmp_path, f"--screenshot={png}", fragment="#node=3")
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape[:2] == (900, 1400)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "the screenshot is nearly uniform"
    assert _has_colour(pixels, NODE_COLOURS["attn"]) > 50, "no attention node drawn"
    assert _has_colour(pixels, NODE_COLOURS["mlp"]) > 50, "no MLP node drawn"
    assert _has_colour(pixels, EDGE_COLOURS["positive"], tol=30) > 20, "no positive edge drawn"
    assert _has_colour(pixels, EDGE_COLOURS["negative"], tol=30) > 20, "no negative edge drawn"


def test_chromium_handles_empty_and_large_circuits(tmp_path):
    page = write_circuit_html(empty_circuit(), tmp_path / "empty.html")
    dom = dump_dom(page, tmp_path)
    assert "The circuit is empty" in dom and not re.search(r"<circle [^>]*data-node=", dom)
    assert "Pruning found no circuit: the full model misses the target loss (0.081 &gt; 0.05)" in dom

    big = large_circuit()
    page = write_circuit_html(big, tmp_path / "large.html")
    dom = dump_dom(page, tmp_path)
    assert len(re.findall(r"<circle [^>]*data-node=", dom)) == len(big["nodes"])
    assert len(re.findall(r'<path class="edge"', dom)) == len(big["edges"])


# Appended to a copy of the page: hovers an edge, then a node, through real DOM events, and writes
# what the card showed onto <body> for --dump-dom to read.
_HOVER_PROBE = """<script>
var svg = document.getElementById("circuit"), tip = document.getElementById("tip");
function hover(el) { el.dispatchEvent(new MouseEvent("mouseover", {bubbles: true, clientX: 200, clientY: 300})); }
hover(svg.querySelector(".hit"));
document.body.dataset.edgeCard = tip.textContent;
svg.dispatchEvent(new MouseEvent("mouseout", {bubbles: true}));
hover(svg.querySelector('[data-node="5"]'));
document.body.dataset.nodeCard = tip.textContent.slice(0, 80);
document.body.dataset.hotEdges = svg.querySelectorAll(".edge.hot").length;
document.body.dataset.focus = svg.classList.contains("focus");
</script></body>"""


def test_chromium_hover_shows_cards_and_highlights_edges(tmp_path):
    circuit = example_circuit()
    page = tmp_path / "probe.html"
    page.write_text(render_circuit_html(circuit).replace("</body>", _HOVER_PROBE), encoding="utf-8")
    body = re.search(r"<body[^>]*>", dump_dom(page, tmp_path)).group(0)
    weakest = min(circuit["edges"], key=lambda e: abs(e["weight"]))  # drawn first, so the first hit path
    src, dst = (circuit["nodes"][weakest[k]] for k in ("src", "dst"))
    assert f'data-edge-card="{src["site"]} #{src["channel"]} → {dst["site"]} #{dst["channel"]}weight +0.3"' in body
    assert 'data-node-card="0.attn.resid_delta #19' in body
    assert f'data-hot-edges="{sum(5 in (e["src"], e["dst"]) for e in circuit["edges"])}"' in body
    assert 'data-focus="true"' in body


def test_faithfulness_curves_are_drawn_for_every_node_order():
    circuit = example_circuit()
    total = circuit["total_nodes"]
    learned = {"curve": [[0, 0.69, 0.0], [1, 0.4, 0.5], [10, 0.1, 0.97], [total, 0.05, 1.0]], "cpr": 0.91, "cmd": 0.09}
    attribution = {"curve": [[0, 0.69, 0.0], [1, 0.6, 0.1], [10, 0.3, 0.6], [total, 0.05, 1.0]], "cpr": 0.7, "cmd": 0.3}
    circuit["faithfulness"] = {"split": "test", "curve": learned["curve"], "cpr": 0.91, "cmd": 0.09,
                               "by_order": {"learned": learned, "attribution": attribution}}
    page = render_circuit_html(circuit)
    start = page.index('<figure class="chart faithfulness">')
    figure = page[start : page.index("</figure>", start)]
    assert "test split" in figure and figure.count("<polyline") == 2
    assert "learned: CPR 0.91, CMD 0.09" in figure and "attribution: CPR 0.7, CMD 0.3" in figure
    # no curves recorded (an older circuit.json, or faithfulness_points=0): no chart, the page still renders
    del circuit["faithfulness"]
    assert 'class="chart faithfulness"' not in render_circuit_html(circuit)
