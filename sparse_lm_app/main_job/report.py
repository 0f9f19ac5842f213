"""The main job's report: ``report.md`` and a self-contained ``report.html``.

Both are built from the stage results the pipeline keeps in
``runs/<name>/stages/*.json``: training curves, the task table, the circuit
tasks' accuracy against training tokens (``task_curves.png``), circuit sizes
(sparse vs dense, learned vs attribution) with links to the circuit pages,
and the intervention plot. Images are embedded in the HTML (base64) and
linked from the Markdown.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from sparse_lm.io import atomic_write_text


def _num(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _rel(path: str | Path | None, base: Path) -> str | None:
    if not path:
        return None
    p = Path(path)
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p)


def _curve_section(ev: dict[str, Any], run_dir: Path) -> tuple[str, str, list[list[str]], list[str]]:
    """The showcase tasks on every snapshot of each run and its final model (the eval stage's curves)."""
    from sparse_lm_app.main_job.curves import CURVE_TASKS, TASK_CURVES_PNG

    curves = ev["curves"]
    tasks = [t for t in CURVE_TASKS if any(t in pt["tasks"] for c in curves.values() for pt in c)]
    rows = [["model", "step", "tokens (M)", "val loss", *(f"{t} accuracy (auc)" for t in tasks)]]

    def cell(numbers: dict[str, float]) -> str:
        acc, auc = _num(numbers.get("accuracy")), numbers.get("auc")
        return acc if auc is None else f"{acc} ({auc:.2f})"

    for key, curve in curves.items():
        for pt in curve:
            rows.append([key, str(pt["step"]), f"{pt['tokens'] / 1e6:.2f}", _num(pt.get("val_loss")),
                         *(cell(pt["tasks"].get(t, {})) for t in tasks)])
    n = ev.get("curve_examples")
    text = (f"Accuracy of the circuit tasks against training tokens: every model snapshot each run saved "
            f"(train.snapshot_every) and its final model (the last point), scored like the table: "
            f"{ev.get('curve_split', 'test')} split" + (f", {n} prompts per task at every point" if n else "") +
            ". In brackets the separation auc: the chance that a prompt of one family gets a larger logit "
            "difference toward its completion than a prompt of the other (0.5: the families are not told apart; "
            "accuracy can stay at 0.5 while it rises, when a bias always picks one completion). Validation loss "
            "as the run logged it at that step (– where it had no validation pass). Chance: 0.5.")
    png = run_dir / TASK_CURVES_PNG
    return "Tasks against training tokens", text, rows, [str(png)] if png.exists() else []


def build_sections(results: dict[str, dict], run_dir: Path) -> list[tuple[str, str, list[list[str]], list[str]]]:
    """(title, text, table rows (first is the header), image paths) per section."""
    sections = []
    data = results.get("data")
    if data:
        sections.append(("Data", (
            (f"The dense model's tokenizer ({data['tokenizer_of']}, vocab {data.get('vocab_size')}) on the Python "
             f"standard library of this interpreter: " if data.get("tokenizer_of") else
             "Byte-level BPE (vocab 2048) trained on the Python standard library of this interpreter: ") +
            f"{data['documents']['train']} train / {data['documents']['validation']} validation files "
            f"({data.get('skipped_files', 0)} not UTF-8, skipped), {data['tokens']['train'] / 1e6:.1f}M train tokens. "
            f"Unigram entropy of the corpus: {data['unigram_entropy_nats']:.3f} nats/token."), [], []))
    rows = [["model", "steps", "minutes", "ranks", "val loss (nats)", "nonzero weights (blocks)", "dead neurons"]]
    images = []
    for key in ("sparse", "dense"):
        s = results.get(key)
        if not s:
            continue
        rows.append([key, str(s["steps"]), f"{s['train_seconds'] / 60:.1f}", str(s["world_size"]),
                     _num(s.get("val_loss")), _num(100 * s["kept_fraction_blocks"], ".2f") + "%"
                     if "kept_fraction_blocks" in s else "dense",
                     _num(100 * s["dead_neuron_share"], ".1f") + "%" if "dead_neuron_share" in s else "–"])
        curves = Path(s["run_dir"]) / "curves.png"
        if curves.exists():
            images.append(str(curves))
    if len(rows) > 1:
        sections.append(("Training", "Both models trained through `scripts/pretrain.sh` (DeepSpeed, gloo on CPU).",
                         rows, images))
    ev = results.get("eval")
    if ev:
        dense = {r["task"]: r for r in ev.get("dense", [])}
        # the bridged pipeline also scores the phase-1 sparse model, before its bridges
        pre = {r["task"]: r for r in ev.get("pretrained", [])}
        rows = [["task", *(["pretrained sparse accuracy"] if pre else []), "sparse accuracy", "sparse loss",
                 "dense accuracy", "dense loss"]]
        for r in ev.get("sparse", []):
            d = dense.get(r["task"], {})
            rows.append([r["task"], *([_num(pre.get(r["task"], {}).get("accuracy"))] if pre else []),
                         _num(r.get("accuracy")), _num(r.get("loss")), _num(d.get("accuracy")), _num(d.get("loss"))])
        sections.append(("Tasks", "Binary next-token tasks, test split; loss is the two-token cross-entropy "
                                  "(chance: ln 2 = 0.693)." + (" The sparse model is the one trained with its bridges; "
                                  "the pretrained column is the same model before them." if pre else ""), rows, []))
        if ev.get("resolution"):  # the bridged pipeline: the tasks through the contract against the dense tokenizer
            rows = [["task", "resolves", "tokens", "checked", "dropped (contract)", "longer than context", "scored"]]
            for r in ev["resolution"]:
                rows.append([r["task"], "yes" if r["resolved"] else "no: " + r.get("error", ""),
                             " / ".join(r.get("tokens", [])) or "–", _num(r.get("checked"), "d"),
                             _num(r.get("dropped"), "d"), _num(r.get("too_long"), "d"), _num(r.get("examples"), "d")])
            sections.append(("Task resolution", ev.get("summary", "") + " Both models are scored on the same kept "
                             "examples (the tokenizer is the dense model's, shared by the sparse model).", rows, []))
        if ev.get("curves"):
            sections.append(_curve_section(ev, run_dir))
    pr = results.get("prune")
    if pr:
        rows = [["task", "model", "method", "tuned by", "target", "nodes", "edges", "loss val", "loss test",
                 "calibrated test", "ablating it (test)", "verdict", "page"]]
        sweeps = []
        for c in pr.get("circuits", []):
            verdict = c.get("reason") or ("keeps target, ablation destroys task" if c.get("keeps_target") and
                                          c.get("destroys_task") else "check: " + ", ".join(
                                              k for k in ("keeps_target", "destroys_task") if not c.get(k)))
            tuned = c.get("tuned_by") or "–"
            if c.get("sweep_iterations"):
                collapsed = f", {c['sweep_collapsed']} of them collapsed" if c.get("sweep_collapsed") else ""
                if c.get("sweep_settled_above"):
                    collapsed += f", {c['sweep_settled_above']} settled far above their open nodes"
                tuned += f" ({c['sweep_iterations']} runs, {c.get('sweep_failures', 0)} failed{collapsed})"
            if c.get("sweep_png") and Path(c["sweep_png"]).exists():
                sweeps.append(c["sweep_png"])
            rows.append([c["task"], c["model"], c["method"], tuned, _num(c.get("target_loss")),
                         _num(c.get("nodes"), "d"), _num(c.get("edges"), "d"), _num(c.get("val_loss")),
                         _num(c.get("loss")), _num(c.get("calibrated_loss")), _num(c.get("ablated_loss")),
                         verdict, _rel(c.get("html"), run_dir) or "–"])
        text = pr.get("summary", "Smallest circuits at the target task loss (learned masks vs attribution).")
        text += (" Edges count nonzero weights between circuit nodes (the paper's definition); residual "
                 "write-to-read links and q-k pairs are listed per type in each circuit.json, not counted. "
                 "Learned circuits come from CARBS sweeps (failure and choice on validation); losses on test "
                 "are reported, never used to choose.")
        eq = pr.get("equal_loss") or {}
        if eq.get("why"):
            text += f" The dense circuits are pruned from the dense model at equal pretraining loss: {eq['why']}."
        ctrl = pr.get("random_control")
        if ctrl:
            text += (f" Random-weights control ({ctrl['task']}, same shape and weight sparsity, target "
                     f"{_num(ctrl.get('target_loss'))}): " +
                     (f"no circuit ({ctrl['reason']})." if ctrl["failed"] else
                      f"{ctrl['nodes']} nodes reach the target: the target is too loose to mean anything."))
        sections.append(("Circuits", text, rows, sweeps))
    circ = results.get("circuit")
    if circ:  # the bridged pipeline's quote circuit, pruned from the sparse model as bridged
        rows = [["task", "target", "nodes", "edges", "loss val", "loss test", "calibrated test", "ablating it (test)",
                 "page"],
                [circ["task"], _num(circ.get("target_loss")), _num(circ.get("nodes"), "d"),
                 _num(circ.get("edges"), "d"), _num(circ.get("val_loss")), _num(circ.get("loss")),
                 _num(circ.get("calibrated_loss")), _num(circ.get("ablated_loss")),
                 _rel(circ.get("html"), run_dir) or "–"]]
        text = ("Learned masks on the sparse model as bridged (its weights after training with the bridges), one run "
                f"at the prune preset's settings; target {circ.get('target_why', _num(circ.get('target_loss')))}.")
        if circ.get("own"):
            text += (f" The model itself: test accuracy {_num(circ['own'].get('accuracy'))}, loss "
                     f"{_num(circ['own'].get('loss'))}.")
        if circ.get("failed"):
            text += f" No circuit: {circ.get('reason')}."
        sections.append(("Circuit of the bridged sparse model", text, rows if not circ.get("failed") else [], []))
    br = results.get("bridge")
    if br:
        gate = br.get("gate") or {}
        text = ""
        if gate:
            text = (f"Bridge ({br.get('mode')}) quality gate on validation: "
                    f"{'PASSED' if gate.get('passed') else 'FAILED'} (both hybrid KLs must be below KL(dense || "
                    f"sparse) without a bridge, {_num(gate.get('kl_no_bridge'))}, and both NMSEs below 0.3: kl_d2s "
                    f"{_num(gate.get('kl_d2s'))}, kl_s2d {_num(gate.get('kl_s2d'))}, nmse_enc "
                    f"{_num(gate.get('nmse_enc'))}, nmse_dec {_num(gate.get('nmse_dec'))}). "
                    + ("" if gate.get("passed") else "The bridge is not called trained; the intervention below "
                       "goes through it anyway and should be read with that in mind. "))
        text += br.get("summary", "")
        imgs = [br["intervention_png"]] if br.get("intervention_png") else []
        rows = [[k, _num(v)] for k, v in br.get("losses", {}).items()]
        sections.append(("Bridge and intervention", text, [["loss", "value"], *rows] if rows else [], imgs))
    return sections


def write_report(results: dict[str, dict], run_dir: Path, title: str = "sparse-lm main job") -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    ev = results.get("eval") or {}
    if ev.get("curves"):  # drawn here, next to the report that shows it
        from sparse_lm_app.main_job.curves import TASK_CURVES_PNG, plot_task_curves

        plot_task_curves(ev["curves"], run_dir / TASK_CURVES_PNG, n=ev.get("curve_examples"),
                         split=ev.get("curve_split", "test"))
    sections = build_sections(results, run_dir)
    md = [f"# {title}", ""]
    for name, text, rows, images in sections:
        md += [f"## {name}", "", text, ""]
        if rows:
            md.append("| " + " | ".join(rows[0]) + " |")
            md.append("|" + "---|" * len(rows[0]))
            md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
            md.append("")
        md += [f"![{Path(i).stem}]({_rel(i, run_dir)})" for i in images] + [""]
    md_path = run_dir / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")

    body = []
    for name, text, rows, images in sections:
        body.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(text)}</p>")
        if rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
            trs = []
            for r in rows[1:]:
                cells = []
                for c in r:
                    if c.endswith(".html") and c != "–":
                        cells.append(f'<td><a href="{html.escape(c)}">circuit page</a></td>')
                    else:
                        cells.append(f"<td>{html.escape(c)}</td>")
                trs.append("<tr>" + "".join(cells) + "</tr>")
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>")
        for i in images:
            p = Path(i)
            if p.exists():
                b64 = base64.b64encode(p.read_bytes()).decode()
                body.append(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{b64}">'
                            f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px/1.45 system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
th{{background:#f3f3f3}}img{{max-width:100%;border:1px solid #eee}}h2{{border-bottom:1px solid #ddd}}</style>
</head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>"""
    html_path = run_dir / "report.html"
    atomic_write_text(html_path, page)
    return md_path, html_path
