"""The main job's stages: each takes the pipeline and returns the JSON-able result it keeps.

Every configurable stage reads the config the pipeline resolved and saved in
``runs/<name>/configs/`` before anything started (see `pipeline.resolve_configs`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sparse_lm.io import write_json

if TYPE_CHECKING:
    from sparse_lm_app.main_job.context import Pipeline

PRUNE_TASKS = ("single_double_quote", "bracket_counting", "set_or_string")
QUOTE_TASK = "single_double_quote"  # the task of the intervention (the paper's quote circuit)
# A model below this validation accuracy on a task is at chance there: it has no task behaviour to find a circuit for.
SOLVED_ACCURACY = 0.6
PAPER_TARGET = 0.15
PAPER_ROOM = 0.02  # a model needs its own loss this far under 0.15 for a circuit at 0.15 to be worth the search
# The loss of a prompt's two answers held at even odds. Mean-ablating every node gives every prompt the same margin,
# so the empty circuit's loss is this or more: a target near it is met by a circuit that carries no task behaviour.
CHANCE_LOSS = math.log(2)


# -- data, training, evaluation --------------------------------------------------------


def stage_data(p: Pipeline) -> dict:
    from sparse_lm.tokenizer import train_tokenizer

    d = p.configs["sparse"].data  # the corpus, vocabulary and block size the training stages expect
    corpus = _load_corpus(p)
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus, vocab_size=d.vocab_size, pretokenizer=d.pretokenizer, out_dir=p.data_dir / "tokenizer")
    print(f"tokenizer: byte-level BPE {len(tok)} ({d.pretokenizer} split) in {time.perf_counter() - t0:.1f}s", flush=True)
    return _pack_corpus(p, corpus, tok)


def _load_corpus(p: Pipeline):
    from sparse_lm.corpus import load_corpus

    d = p.configs["sparse"].data
    corpus = load_corpus(d.source, pattern=d.pattern, max_documents=d.max_documents)
    print(f"corpus: {d.source} ({len(corpus)} files, {corpus.num_bytes() / 1e6:.1f} MB, "
          f"{corpus.skipped} not UTF-8 and skipped)", flush=True)
    return corpus


def _pack_corpus(p: Pipeline, corpus, tok) -> dict:
    """The corpus tokenized with `tok` and packed into the sparse stage's blocks in ``runs/<name>/data``."""
    from sparse_lm.data import prepare_data
    from tasks.contract import tokenizer_label

    d = p.configs["sparse"].data
    meta = prepare_data(corpus, tok, p.data_dir, block_size=d.block_size, val_fraction=d.val_fraction,
                        num_proc=d.num_proc)
    return {"documents": meta["num_documents"], "tokens": meta["num_tokens"],
            "unigram_entropy_nats": meta["unigram_entropy_nats"], "skipped_files": meta["skipped_files"],
            "tokenizer": tokenizer_label(tok), "vocab_size": len(tok)}


def stage_sparse(p: Pipeline) -> dict:
    return p.launch("pretrain", "sparse")


def stage_dense(p: Pipeline) -> dict:
    return p.launch("train-dense", "dense")


def stage_eval(p: Pipeline) -> dict:
    import torch

    from sparse_lm.loading import load_model_and_tokenizer
    from sparse_lm_app.main_job.curves import CURVE_SPLIT, CURVE_TASKS, model_curve
    from tasks import evaluate_tasks_or_report, format_table

    out: dict = {}
    curves = {}
    for key in ("sparse", "dense"):
        model, tok = load_model_and_tokenizer(p.results[key]["model_dir"])
        with torch.no_grad():
            rows = evaluate_tasks_or_report(model, tok, split="test", n=p.plan.eval_examples)
        del model
        print(f"\ntasks, {key} model ({p.results[key]['model_dir']}), test split:\n{format_table(rows)}", flush=True)
        out[key] = rows
        # accuracy against training tokens: the same scoring on every snapshot of the run, the final point is `rows`
        print(f"-- {key} model: {', '.join(CURVE_TASKS)} on every snapshot of {p.results[key]['run_dir']}",
              flush=True)
        curve = model_curve(p, key, rows)
        if curve:
            curves[key] = curve
        else:
            print("   no snapshots (train.snapshot_every 0): no curve", flush=True)
    if curves:  # absent when neither run saved a snapshot
        out.update(curves=curves, curve_split=CURVE_SPLIT, curve_examples=p.plan.curve_examples)
    return out


# -- prune -------------------------------------------------------------------------------


def has_room(own_loss: float, margin: float = 0.05) -> bool:
    """Whether a model's own task loss leaves a target (own loss + margin) at least ``margin`` under chance.

    A model just above chance accuracy can have a loss near ln 2 (bracket_counting at 0.65 accuracy: 0.67
    nats), and a target of own loss + margin then sits at or above the empty circuit's loss: any handful of
    nodes that sets the bias meets it, so the "circuit" would say nothing about the task.
    """
    return own_loss + 2 * margin <= CHANCE_LOSS


def common_target(own: dict[str, dict], margin: float = 0.05) -> tuple[float, str]:
    """One target loss per task for every model pruned on it, so circuit sizes compare at equal loss.

    The paper's 0.15 nats when every model reaches it with room (own loss + margin <= 0.15), else the worst
    model's own loss + margin.
    """
    worst = max(o["loss"] for o in own.values())
    if worst + margin <= PAPER_TARGET:
        return PAPER_TARGET, f"{PAPER_TARGET} (paper)"
    target = round(worst + margin, 4)
    return target, f"{target:.3f} (the worse model's own loss {worst:.3f} + {margin}: above the paper's 0.15)"


def stage_prune(p: Pipeline) -> dict:
    """Smallest circuits of three tasks in both models at a common target loss: learned masks and attribution."""
    from sparse_lm.loading import load_model_and_tokenizer

    keys = ("sparse", "dense")
    dirs = {"sparse": p.results["sparse"]["model_dir"]}
    dirs["dense"], equal_loss = equal_loss_model(p)
    print(f"-- dense model at equal pretraining loss: {equal_loss['why']}", flush=True)
    loaded = {k: load_model_and_tokenizer(dirs[k]) for k in keys}
    p.prune_dirs = dirs
    rows, targets = [], {}
    for task in PRUNE_TASKS:
        task_rows, target = prune_task(p, loaded, task)
        rows += task_rows
        if target:
            targets[task] = target
    for row in rows:
        row["model_dir"] = dirs[row["model"]]
    control = random_control(p, loaded["sparse"], targets)
    return {"circuits": rows, "targets": targets, "summary": prune_summary(rows), "equal_loss": equal_loss,
            "random_control": control}


def random_control(p: Pipeline, loaded, targets: dict, task: str = "single_double_quote") -> dict:
    """Prune a randomly initialised model of the sparse model's shape (same per-matrix weight sparsity) on the
    quote task at the quote target: a circuit only means something if this fails."""
    from pruning.control import random_weights_like
    from pruning.pruner import prune

    model, tok = loaded
    target = targets.get(task, {}).get("target_loss", PAPER_TARGET)
    control = random_weights_like(model, seed=0)
    cfg = p.prune_config(task=task, method="learned", target_loss=target)
    out = p.run_dir / "circuits" / f"random-{task}-learned"
    print(f"-- random-weights control ({task}, target {target:.3f}): ", end="", flush=True)
    c = prune(control, tok, cfg, progress=False, fallback_dir=str(out))
    if c.failed:
        print(f"no circuit, as it should be: {c.reason}", flush=True)
        return {"task": task, "target_loss": target, "failed": True, "reason": c.reason}
    m = c.metrics
    print(f"{c.num_nodes} nodes, {c.num_edges} edges, test loss {m['circuit']['loss']:.3f} (a random model reached "
          f"the target: the target is too loose to mean anything)", flush=True)
    return {"task": task, "target_loss": target, "failed": False, "nodes": c.num_nodes, "edges": c.num_edges,
            "loss": m["circuit"]["loss"], "full_loss": m["full_model"]["loss"]}


def equal_loss_model(p: Pipeline) -> tuple[str, dict]:
    """The dense model whose validation loss is closest to the sparse model's: its final export or one of the
    snapshots its run saved (``train.snapshot_every``). The paper compares circuits at equal pretraining loss."""
    from sparse_lm_app.main_job.curves import logged_val_losses, snapshot_folders

    sparse_loss = p.results["sparse"].get("val_loss")
    run = Path(p.results["dense"]["run_dir"])
    final = (p.results["dense"]["model_dir"], p.results["dense"].get("val_loss"), p.results["dense"]["steps"])
    candidates = [final]
    val_at = logged_val_losses(run)
    candidates += [(str(folder), val_at[step], step) for step, folder in snapshot_folders(run) if step in val_at]
    if sparse_loss is None or any(c[1] is None for c in candidates[:1]):
        return final[0], {"why": "the final dense model (no validation losses to match)", "step": final[2]}
    path, loss, step = min(candidates, key=lambda c: abs(c[1] - sparse_loss))
    why = (f"step {step} of {final[2]} ({path}), validation loss {loss:.3f} against the sparse model's "
           f"{sparse_loss:.3f}; {len(candidates)} candidate(s)")
    return path, {"why": why, "path": path, "step": step, "dense_val_loss": loss, "sparse_val_loss": sparse_loss,
                  "candidates": len(candidates)}


def _own_losses(p: Pipeline, loaded: dict, task: str) -> tuple[dict, dict]:
    """Each model's task data and its own (loss, accuracy) on the task, on the validation split: the target and
    the at-chance decision are choices, so they never read the test split the circuits are reported on."""
    import torch

    from pruning.forward import evaluate, load_task_data, loss_and_accuracy
    from sparse_lm.arch import context_length

    data, own = {}, {}
    for k, (model, tok) in loaded.items():
        model.eval()
        data[k] = load_task_data(tok, p.prune_config(task=task), max_length=context_length(model))
    for k, (model, _) in loaded.items():
        with torch.no_grad():
            val = loss_and_accuracy(evaluate(model, data[k].val)[0], data[k].val.family)
        own[k] = {"loss": val["loss"], "accuracy": val["accuracy"], "split": "val"}
    return data, own


def prune_task(p: Pipeline, loaded: dict, task: str) -> tuple[list[dict], dict | None]:
    """Both models, both methods, at one common target (and at the paper's 0.15 where a model reaches it)."""
    from pruning.forward import PruneError
    from tasks.contract import TaskTokenizationError

    keys = tuple(loaded)
    try:
        data, own = _own_losses(p, loaded, task)
    except (TaskTokenizationError, PruneError) as e:  # e.g. a tokenizer that cannot express the task
        print(f"-- {task}: {e}", flush=True)
        return [{"model": k, "task": task, "method": m, "failed": True, "reason": str(e)}
                for k in keys for m in ("learned", "attribution")], None
    margin = p.plan.target_margin
    solved = [k for k in keys if own[k]["accuracy"] >= SOLVED_ACCURACY and has_room(own[k]["loss"], margin)]
    if not solved and not p.plan.prune_at_chance:
        reason = (f"no model solves {task} well enough for a circuit (validation accuracy, loss: " +
                  ", ".join(f"{k} {own[k]['accuracy']:.2f}, {own[k]['loss']:.3f}" for k in keys) +
                  f"; a circuit needs accuracy >= {SOLVED_ACCURACY} and a target, own loss + {margin}, at least "
                  f"{margin} under chance, ln 2 = {CHANCE_LOSS:.3f})")
        print(f"-- {task}: {reason}", flush=True)
        return [{"model": k, "task": task, "method": m, "failed": True, "reason": reason, "own": own[k]}
                for k in keys for m in ("learned", "attribution")], None
    pruned = [k for k in keys if k in solved or p.plan.prune_at_chance]
    target, why = common_target({k: own[k] for k in pruned}, margin=p.plan.target_margin)
    print(f"-- {task}: target loss {why}", flush=True)
    jobs = [(k, method, target, "") for k in keys for method in ("learned", "attribution")]
    # A model under the paper's target on its own (with a little room) also gets its learned circuit at
    # that target, when the common target is looser (the other model misses 0.15).
    jobs += [(k, "learned", PAPER_TARGET, "-paper") for k in pruned
             if target > PAPER_TARGET and own[k]["loss"] + PAPER_ROOM <= PAPER_TARGET and not p.plan.prune_at_chance]
    rows = []
    for k, method, tgt, suffix in jobs:
        row = {"model": k, "task": task, "method": method, "target_loss": tgt, "own": own[k],
               "target_kind": "paper" if suffix else "common"}
        rows.append(row)
        if k not in pruned:
            acc, loss = own[k]["accuracy"], own[k]["loss"]
            row.update(failed=True, reason=f"{k} model does not solve {task} well enough for a circuit (validation "
                                           f"accuracy {acc:.2f}, loss {loss:.3f}: see the task's target)")
            continue
        row.update(prune_one(p, loaded[k], k, data[k], task, method, tgt, suffix))
    return rows, {"target_loss": target, "why": why, "own": own}


def prune_one(p: Pipeline, loaded, key: str, data, task: str, method: str, target: float, suffix: str) -> dict:
    """One circuit, written to circuits/<model>-<task>-<method><suffix>/ and summarised as a report row.

    Learned circuits come from a CARBS sweep (`pruning.sweep`) with the same protocol and budget for
    both models; attribution is one deterministic run."""
    out = p.run_dir / "circuits" / f"{key}-{task}-{method}{suffix}"
    base = p.prune_config(task=task, method=method, target_loss=target)
    model_dir = p.prune_dirs[key]
    print(f"   prune {key} model, {method}, target {target:.3f}: ", end="", flush=True)
    t0 = time.perf_counter()
    if method == "learned":
        row = _sweep_circuit(p, base, model_dir, out)
    else:
        row = _single_circuit(loaded, base, data, model_dir, out)
    row["seconds"] = time.perf_counter() - t0
    if row["failed"]:
        print(f"no circuit: {row['reason']}", flush=True)
        return row
    print(f"{row['nodes']} nodes, {row['edges']} edges; test loss {row['loss']:.3f} (model {row['full_loss']:.3f}), "
          f"{row['ablated_loss']:.3f} with the circuit ablated; {row['seconds']:.0f}s", flush=True)
    return row


def _sweep_circuit(p: Pipeline, base, model_dir: str, out: Path) -> dict:
    from pruning.sweep import Sweep, SweepConfig
    from sparse_lm import config as configlib

    cfg = configlib.from_dict(SweepConfig, {"prune": configlib.to_dict(base), "iterations": p.plan.sweep_iterations,
                                            "workers": p.plan.sweep_workers, "objective": "nodes"})
    sweep = Sweep(cfg, model_dir, out)  # resumes from out/sweep_state.json after an interruption
    sweep.run(progress=False)
    summary = sweep.summary()
    row = {"tuned_by": "carbs", "sweep_iterations": summary["iterations"], "sweep_failures": summary["failures"],
           "sweep_collapsed": summary["collapsed"], "sweep_settled_above": summary["settled_above"],
           "sweep_png": summary["plot"]}
    if summary["best"] is None:
        stopped = ""
        if summary["collapsed"] or summary["settled_above"]:
            stopped = (f" ({summary['collapsed']} collapsed, {summary['settled_above']} settled far above the nodes "
                       f"their masks left open: circuits near the whole model)")
        return {**row, "failed": True, "reason": f"no sweep run reached the target on validation in "
                                                  f"{summary['iterations']} iterations{stopped}"}
    circuit = json.loads((out / "circuit.json").read_text())
    return {**row, **circuit_row(circuit, out)}


def _single_circuit(loaded, base, data, model_dir: str, out: Path) -> dict:
    from pruning.pruner import prepare_inputs, prune
    from sparse_lm import config as configlib

    model, tok = loaded
    inputs = prepare_inputs(model, tok, base, data=data, model_dir=model_dir, fallback_dir=str(out))
    c = prune(model, tok, base, progress=False, data=inputs[0], means=inputs[1], model_dir=model_dir,
              fallback_dir=str(out))
    if c.failed:
        return {"tuned_by": "none", "failed": True, "reason": c.reason}
    c.write(out, configlib.to_dict(base), model_dir)
    return {"tuned_by": "none", **circuit_row(c.to_json(), out)}


def circuit_row(c: dict, out: Path) -> dict:
    """The report's and results.json's numbers of one written circuit (split named on each loss)."""
    m = c["metrics"]
    row = {"failed": False, "reason": None, "nodes": c["num_nodes"], "edges": c["num_edges"],
           "edges_by_type": c.get("edges_by_type"), "edges_all_links": c.get("num_edges_all_links"),
           "total_nodes": c.get("total_nodes"), "loss": m["circuit"]["loss"], "accuracy": m["circuit"]["accuracy"],
           "calibrated_loss": m.get("circuit_calibrated", {}).get("loss"),
           "ablated_loss": m["circuit_ablated"]["loss"], "full_loss": m["full_model"]["loss"],
           "keeps_target": c["verification"]["keeps_target"], "destroys_task": c["verification"]["destroys_task"],
           "circuit_dir": str(out), "html": str(out / "circuit.html")}
    val = m.get("circuit_val", {}).get("loss")
    if val is not None:
        row["val_loss"] = val
    val_cal = m.get("circuit_calibrated_val", {}).get("loss")
    if val_cal is not None:
        row["calibrated_val_loss"] = val_cal
    if "faithfulness" in c:
        row["faithfulness"] = {k: v for k, v in c["faithfulness"].items() if k != "curve"}
    return row


def prune_summary(rows: list[dict]) -> str:
    def find(model: str, task: str, method: str) -> dict | None:
        return next((r for r in rows if (r["model"], r["task"], r["method"]) == (model, task, method)
                     and r.get("target_kind", "common") == "common" and not r["failed"]), None)

    text = ("Circuits at one target loss per task for both models (the paper's 0.15 nats when both reach it with "
            "0.05 to spare, else the worse model's own loss + 0.05); learned masks against attribution pruning.")
    for label, (a, b) in {"dense/sparse": (("dense", "learned"), ("sparse", "learned")),
                          "attribution/learned (sparse)": (("sparse", "attribution"), ("sparse", "learned"))}.items():
        ratios = []
        for task in PRUNE_TASKS:
            x, y = find(a[0], task, a[1]), find(b[0], task, b[1])
            if x and y and x["edges"] and y["edges"]:
                ratios.append(x["edges"] / y["edges"])
        if ratios:
            gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            text += f" Edge ratio {label}: {gm:.1f}x (geometric mean over {len(ratios)} task(s))."
    return text


# -- bridge and intervention ----------------------------------------------------------------


def stage_bridge(p: Pipeline) -> dict:
    """Bridges trained the paper's way (the trained sparse model continues with its bridges against the frozen
    dense model), the quality gate, the quote circuit pruned from the sparse model *as bridged*, then the
    intervention (chosen on train prompts, measured on test)."""
    result = stage_bridge_train(p)
    result.update(run_intervention(p, Path(result["bridge_dir"])))
    return result


def stage_bridge_train(p: Pipeline) -> dict:
    """The bridge job with the saved config (mode as configured) and its quality gate; nothing after it."""
    out = p.launch_dir("bridge")
    p.launch("bridge", "bridge")
    summary = json.loads((out / "summary.json").read_text())
    gate = summary.get("gate") or {}
    print(f"-- bridge quality gate (validation): {'passed' if gate.get('passed') else 'FAILED'}: "
          f"kl_d2s {gate.get('kl_d2s', float('nan')):.3f}, kl_s2d {gate.get('kl_s2d', float('nan')):.3f} vs no bridge "
          f"{gate.get('kl_no_bridge', float('nan')):.3f}; nmse_enc {gate.get('nmse_enc', float('nan')):.3f}, "
          f"nmse_dec {gate.get('nmse_dec', float('nan')):.3f}", flush=True)
    result = {"bridge_dir": str(out), "mode": summary.get("mode"), "gate": gate, "trained": bool(gate.get("passed")),
              "losses": {**{f"{k} before": v for k, v in summary["before"].items()},
                         **{f"{k} after": v for k, v in summary["after"].items()}},
              "train_seconds": summary.get("train_seconds")}
    return result


def _bridged_sparse_dir(bridge_dir: Path) -> Path:
    """The sparse model as bridged (finetune/joint modes export it), else the frozen one it used."""
    own = bridge_dir / "sparse_model"
    if (own / "config.json").is_file():
        return own
    cfg = json.loads((bridge_dir / "config.json").read_text())
    return Path(cfg["sparse"])


def prune_bridged_quote_circuit(p: Pipeline, bridge_dir: Path, task: str) -> dict:
    """The quote circuit of the sparse model as bridged, with the hyperparameters the prune stage's sweep found
    best for the sparse quote circuit (one run: the sweep itself was on the pre-bridge weights)."""
    from pruning.pruner import prune
    from sparse_lm import config as configlib
    from sparse_lm.loading import load_model_and_tokenizer

    found = [r for r in p.results["prune"]["circuits"] if (r["model"], r["task"], r["method"]) ==
             ("sparse", task, "learned") and not r.get("failed")]
    if not found:
        return {"failed": True, "reason": f"no learned {task} circuit in the sparse model to take settings from"}
    row = min(found, key=lambda r: r["target_loss"])  # the strictest target that was reached
    saved = json.loads((Path(row["circuit_dir"]) / "config.json").read_text())
    settings = {k: v for k, v in saved.items() if k not in ("job", "model")}
    cfg = configlib.from_dict(type(p.configs["prune"]), settings)
    model_dir = _bridged_sparse_dir(bridge_dir)
    model, tok = load_model_and_tokenizer(model_dir)
    # Training with its bridges can cost the sparse model some of its own task skill; the circuit is a means to
    # choose the channels to move, so a model that now misses the prune stage's target is pruned at its own
    # validation loss + margin instead (the target's rule, applied to this model alone).
    _, own = _own_losses(p, {"sparse": (model, tok)}, task)
    own_target, why = common_target(own, margin=p.plan.target_margin)
    if own_target > cfg.target_loss:
        cfg.target_loss = own_target
    else:
        why = f"{cfg.target_loss:.3f} (the prune stage's)"
    out = bridge_dir / f"circuit-{task}"
    print(f"-- prune the bridged sparse model ({model_dir}), {task}: own validation loss "
          f"{own['sparse']['loss']:.3f}; target {why}: ", end="", flush=True)
    c = prune(model, tok, cfg, progress=False, model_dir=str(model_dir), fallback_dir=str(out))
    if c.failed:
        print(f"no circuit: {c.reason}", flush=True)
        return {"failed": True, "reason": c.reason, "target_loss": cfg.target_loss, "target_why": why}
    c.write(out, configlib.to_dict(cfg), str(model_dir))
    print(f"{c.num_nodes} nodes, {c.num_edges} edges, test loss {c.metrics['circuit']['loss']:.3f}", flush=True)
    return {"failed": False, "circuit_dir": str(out), "nodes": c.num_nodes, "edges": c.num_edges,
            "loss": c.metrics["circuit"]["loss"], "target_loss": cfg.target_loss, "target_why": why,
            "own": own["sparse"], "model_dir": str(model_dir)}


# The moves the intervention reports: the paper's picture (the channel the sparse model's own answer follows most),
# the channel whose edit the bridge carries best into the dense model, both chosen on train prompts, and the
# circuit's best channels at the first one's site.
INTERVENTION_PARTS = {"single": "The paper's single channel",
                      "single_dense": "The single channel the bridge carries best (chosen by the dense model's "
                                      "change on train prompts)",
                      "multi": "The circuit's best channels"}


def run_intervention(p: Pipeline, bridge_dir: Path, circuit: dict | None = None) -> dict:
    """The quote intervention through the bridge in `bridge_dir`, with `circuit` (a circuit row: failed, reason,
    circuit_dir) or, when None, the quote circuit pruned here from the sparse model as bridged."""
    from bridges.intervene import (
        format_result,
        intervene,
        plot_intervention,
        read_circuit,
    )
    from bridges.train import load_bridge
    from pruning.forward import precision_context
    from tasks import get_task

    task = QUOTE_TASK
    if circuit is None:
        circuit = prune_bridged_quote_circuit(p, bridge_dir, task)
    if circuit["failed"]:
        print(f"-- intervention skipped: {circuit['reason']}", flush=True)
        return {"circuit": circuit, "summary": f"Intervention skipped: {circuit['reason']}."}
    pair, tokenizer, _ = load_bridge(bridge_dir, "cpu")
    out = p.run_dir / "intervention"
    precision = p.plan.intervention_precision
    extra = {} if p.plan.intervention_alphas is None else {"alphas": p.plan.intervention_alphas}
    if precision != "fp32":
        pair.dense.requires_grad_(False)  # bf16 linears cast the (frozen) weights once
    try:
        with precision_context(precision, "cpu", pair.dense):  # the dense model's linear layers only
            r = intervene(pair, tokenizer, get_task(task), read_circuit(circuit["circuit_dir"]), select_split="train",
                          split="test", n_examples=p.plan.intervention_examples,
                          n_controls=p.plan.intervention_controls, dense_single=True, **extra)
    except ValueError as e:  # e.g. a circuit without residual channels
        print(f"-- intervention skipped: {e}", flush=True)
        return {"circuit": circuit, "summary": f"Intervention skipped: {e}."}
    if precision != "fp32":
        r["dense_precision"] = precision
    write_json(out / "intervention.json", r)
    png = plot_intervention(r, out / "intervention.png")
    print(format_result(r), flush=True)
    return {"circuit": circuit, "summary": intervention_summary(r, task), "intervention_png": str(png),
            "intervention_json": str(out / "intervention.json"), "alphas": r["alphas"],
            "interventions": {name: _intervention_part(r[name]) for name in INTERVENTION_PARTS if name in r},
            "select_split": r["select_split"], "eval_split": r["split"],
            **({"dense_precision": precision} if precision != "fp32" else {})}


# -- the bridged pipeline: a pretrained dense model, a sparse model pretrained on its tokenizer, then its bridges -


def stage_bridged_data(p: Pipeline) -> dict:
    """The dense model's tokenizer saved to ``runs/<name>/data/tokenizer``, then the corpus packed with it: the sparse
    model pretrains on the dense model's vocabulary, because a bridge needs one tokenizer on both sides."""
    from sparse_lm.io import atomic_dir
    from sparse_lm.tokenizer import load_tokenizer

    ref = p.configs["bridge"].dense
    tok = dense_tokenizer(ref)
    with atomic_dir(p.data_dir / "tokenizer") as tmp:
        tok.save_pretrained(tmp)
    print(f"tokenizer: the dense model's ({ref}), {len(tok)} tokens -> {p.data_dir / 'tokenizer'}", flush=True)
    # packed with the tokenizer as saved, so the data's tokenizer hash is the one the training stages load
    return {**_pack_corpus(p, _load_corpus(p), load_tokenizer(p.data_dir / "tokenizer")), "tokenizer_of": str(ref)}


def dense_tokenizer(ref: str):
    """The tokenizer of the dense model `ref` (a model folder, a .gguf file or a package shipping one), without
    loading its weights (dequantising SmolLM2 takes ~30 s): the one beside a GGUF file when there is one, else the
    GGUF's own metadata, as `sparse_lm.loading.load_gguf` reads it; the bridge stage checks that the two agree."""
    from transformers import AutoTokenizer

    from sparse_lm.loading import gguf_path, load_tokenizer_of, model_dir

    gguf = gguf_path(ref)
    if gguf is None:
        return load_tokenizer_of(model_dir(ref))
    if (gguf.parent / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(gguf.parent))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def stage_bridged_eval(p: Pipeline) -> dict:
    """Both models of the bridge on the tasks, through the tokenization contract against their one tokenizer (the
    dense model's): which tasks resolve, how many test examples each drops (the contract) or leaves out (longer
    than the shorter context of the two models), then both models' loss and accuracy on the same kept examples."""
    import torch

    from bridges.models import load_dense
    from pruning.forward import evaluate, fast_head_ok, loss_and_accuracy
    from sparse_lm.arch import context_length
    from sparse_lm.loading import load_model_and_tokenizer
    from tasks import (
        TaskTokenizationError,
        format_table,
        get_task,
        list_tasks,
        resolve_task,
    )
    from tasks.contract import encode_plain, tokenizer_label
    from tasks.evaluate import separation_auc
    from tasks.loss import encode_examples

    bridge_dir = Path(p.results["bridge"]["bridge_dir"])
    meta = json.loads((bridge_dir / "bridge_config.json").read_text())
    sparse_dir = _bridged_sparse_dir(bridge_dir)
    sparse, tok = load_model_and_tokenizer(sparse_dir)
    dense, _, dense_path = load_dense(meta["dense_model"])
    models = {"sparse": sparse, "dense": dense}
    paths = {"sparse": str(sparse_dir), "dense": str(dense_path)}
    pretrained_dir = (p.results.get("sparse") or {}).get("model_dir")
    if pretrained_dir:  # the phase-1 model the bridge started from: did pretraining teach the task, or the bridge?
        models["pretrained"], _ = load_model_and_tokenizer(pretrained_dir)
        paths["pretrained"] = str(pretrained_dir)
    limit = min(context_length(m) for m in models.values())
    names = list(p.plan.eval_tasks or list_tasks())
    rows: dict[str, list[dict]] = {k: [] for k in models}
    fast: dict[str, bool] = {}
    resolution = []
    for name in names:
        task = get_task(name)
        try:
            resolved = resolve_task(task, tok, task.examples("test", p.plan.eval_examples, 0))
        except TaskTokenizationError as e:  # the tokenizer cannot express the task: a row with its reason
            error = str(e).splitlines()[0]
            resolution.append({"task": task.name, "resolved": False, "error": error})
            for k in models:
                rows[k].append({"task": task.name, "loss": float("nan"), "accuracy": float("nan"), "examples": 0,
                                "dropped": "-", "error": error})
            continue
        lengths = [len(ids) for ids in encode_plain(tok, [ex.prompt for ex in resolved.examples])]
        kept = [ex for ex, n in zip(resolved.examples, lengths) if n <= limit]
        res = {"task": task.name, "resolved": True, "completions": list(resolved.completions),
               "tokens": list(resolved.token_strings), "checked": resolved.checked, "dropped": resolved.dropped,
               "too_long": len(resolved.examples) - len(kept), "examples": len(kept)}
        resolution.append(res)
        if len({ex.family for ex in kept}) < 2:
            error = f"no prompts of one family fit the context of {limit} tokens"
            res["error"] = error
            for k in models:
                rows[k].append({"task": task.name, "loss": float("nan"), "accuracy": float("nan"), "examples": 0,
                                "dropped": resolved.dropped + res["too_long"], "error": error})
            continue
        batch = encode_examples(tok, kept, max_length=limit)
        for k, model in models.items():
            with torch.no_grad():
                if k not in fast:  # the last-position shortcut, checked once per model against the full forward
                    fast[k] = fast_head_ok(model, batch)
                margin = evaluate(model, batch, fast=fast[k])[0]
                m = loss_and_accuracy(margin, batch.family)
            rows[k].append({"task": task.name, "loss": m["loss"], "accuracy": m["accuracy"],
                            "auc": separation_auc(margin, batch.family), "examples": len(kept),
                            "dropped": resolved.dropped + res["too_long"]})
    ok = [r for r in resolution if r["resolved"]]
    summary = (f"{len(ok)} of {len(resolution)} tasks resolve against the tokenizer {tokenizer_label(tok)}; of "
               f"{sum(r['checked'] for r in ok)} test examples checked, {sum(r['dropped'] for r in ok)} break the "
               f"contract and {sum(r['too_long'] for r in ok)} are longer than the {limit}-token context")
    failed = [r["task"] for r in resolution if not r["resolved"]]
    if failed:
        summary += f"; not resolved: {', '.join(failed)}"
    print(f"\n{summary}.\n{format_table([{k: v for k, v in r.items() if k != 'completions'} for r in resolution])}",
          flush=True)
    for k in models:
        print(f"\ntasks, {k} model, test split:\n{format_table(rows[k])}", flush=True)
    return {**rows, "models": paths, "split": "test",
            "tokenizer": tokenizer_label(tok), "context": limit, "resolution": resolution, "summary": summary + "."}


def stage_bridged_circuit(p: Pipeline) -> dict:
    """The quote circuit of the sparse model as bridged: learned masks, one run at the prune preset's settings,
    at the paper's 0.15 nats when the model reaches it with room, else at its own loss + the plan's margin."""
    from pruning.forward import PruneError
    from sparse_lm.loading import load_model_and_tokenizer
    from tasks.contract import TaskTokenizationError

    task = QUOTE_TASK
    bridge_dir = Path(p.results["bridge"]["bridge_dir"])
    model_dir = _bridged_sparse_dir(bridge_dir)
    loaded = load_model_and_tokenizer(model_dir)
    row = {"model": "sparse", "task": task, "method": "learned", "bridged": True, "model_dir": str(model_dir)}
    try:
        data, own = _own_losses(p, {"sparse": loaded}, task)
    except (TaskTokenizationError, PruneError) as e:
        print(f"-- {task}: {e}", flush=True)
        return {**row, "failed": True, "reason": str(e)}
    target, why = common_target(own, margin=p.plan.target_margin)
    cfg = p.prune_config(task=task, method="learned", target_loss=target)
    out = bridge_dir / f"circuit-{task}"
    mine = own["sparse"]
    print(f"-- prune the bridged sparse model ({model_dir}), {task}: own validation accuracy {mine['accuracy']:.2f}, "
          f"loss {mine['loss']:.3f}; target loss {why}: ", end="", flush=True)
    t0 = time.perf_counter()
    found = _single_circuit(loaded, cfg, data["sparse"], str(model_dir), out)
    row.update(own=mine, target_loss=target, target_why=why, seconds=time.perf_counter() - t0, **found)
    if not row["failed"]:
        written = json.loads((out / "circuit.json").read_text())
        row["target_loss"] = written.get("target_loss", target)  # the pruner's own (prune.relative_margin wins)
        print(f"{row['nodes']} nodes, {row['edges']} edges; test loss {row['loss']:.3f} (model "
              f"{row['full_loss']:.3f}), {row['ablated_loss']:.3f} with the circuit ablated", flush=True)
    else:
        print(f"no circuit: {row['reason']}", flush=True)
    return row


def stage_bridged_intervention(p: Pipeline) -> dict:
    """The quote intervention through the bridge with the circuit of the `circuit` stage."""
    return run_intervention(p, Path(p.results["bridge"]["bridge_dir"]), circuit=p.results["circuit"])


def _intervention_part(part: dict) -> dict:
    return {"channels": part["channel"]["channels"], "site": part["channel"]["bridge_site"],
            "dense_site": part["channel"]["dense_site"], "effect": part["dense"]["delta_p"],
            "sparse_effect": part["sparse"]["delta_p"], "control_mean": part["control"]["delta_p"],
            "control_sd": part["control"]["std"], "effect_sd": part["effect_sd"],
            "effect_alpha": part["effect_alpha"], "sign_ok": part["sign_ok"]}


def intervention_summary(r: dict, task: str) -> str:
    k = r["alphas"].index(max(r["alphas"]))
    text = (f"Intervention on {task}: site, channels and family means chosen on {r['select_split']} prompts, the "
            f"effect measured on {r['examples']} {r['split']} prompts. ")
    for name, label in INTERVENTION_PARTS.items():
        if name not in r:
            continue
        part = r[name]
        ch = part["channel"]
        text += (f"{label} ({ch['channels']} at {ch['bridge_site']}, carried into the dense residual at "
                 f"{ch['dense_site']}): at alpha {r['alphas'][k]:g} the dense model's P(other family's completion) "
                 f"changes by {part['dense']['delta_p'][k]:+.3f}, against {part['control']['delta_p'][k]:+.3f} ± "
                 f"{part['control']['std'][k]:.3f} for random channels of the same count and norm; at alpha "
                 f"{part['effect_alpha']:g} that is {part['effect_sd'] if part['effect_sd'] is not None else float('nan'):.1f} "
                 f"control standard deviations, sign {'as moved' if part['sign_ok'] else 'AGAINST the move'} "
                 f"(the sparse model itself: {part['sparse']['delta_p'][k]:+.3f}). ")
    return text.strip()


def stage_report(p: Pipeline) -> dict:
    from sparse_lm_app.main_job.report import write_report

    results = dict(p.results)
    if "intervene" in results:  # the bridged pipeline: the report shows the gate and the intervention together
        results["bridge"] = {**results.get("bridge", {}), **results["intervene"]}
    md, page = write_report(results, p.run_dir)
    print(f"report: {page} and {md}", flush=True)
    return {"report_html": str(page), "report_md": str(md)}
