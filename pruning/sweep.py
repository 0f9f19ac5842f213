"""``sparse-lm sweep``: CARBS over the pruner's hyperparameters (SPEC §5-6).

Each iteration prunes the model with hyperparameters suggested by CARBS and
observes the circuit's size at the target loss (nodes, or edges as the paper
counts them: `pruning.graph`). The protocol (SPEC §5):

- searched: k_coef, lr, weight decay, beta2, Heaviside temperature, init noise
  (the paper's six; the pruner has no warmup to search), centred on the base
  PruneConfig;
- failure and objective on the VALIDATION split: a run fails when the search
  fails or its circuit's validation loss misses the target
  (`pruning.circuit.sweep_outcome`); a run whose masks collapse toward chance
  (the pruner's collapse test, read on the train minibatches from a fifth of
  the steps on) ends there (``stop_collapsed``, on by default): finished, such
  a run bisects an order its masks never learned and ends near the whole model,
  slower than a good run. CARBS observes it as what it would have ended as, a
  circuit of the whole model (every node; the whole model's weight edges for the
  ``edges`` objective), not as a failure: reported as failures, collapses left
  CARBS with 2 circuits in 16 runs on the main job's dense model (README,
  "sparse-lm sweep"). The row records ``collapsed`` and the run is never the
  best; the best circuit is the smallest that passes. So is a run whose masks
  closed too much (``stop_settled_above``, on by default): once its bisection
  finds a count past 8x the nodes left open (+ 10) still missing the target,
  the circuit will end near the whole model (past the open set the order is a
  guess), and the run stops there (row ``settled_above``);
- the test split is read for the best circuit only: runs stop once their
  circuit is chosen on validation (``prune(measure=False)``: no test metrics,
  calibration or snippets), and the kept circuit is measured at the end
  (`pruning.pruner.finish_circuit`, with its faithfulness curves), as a lone
  ``prune`` with its settings would have; its row gets ``test_loss`` then;
- a suggestion equal to a finished run's (CARBS re-suggests its best point; 6 of the
  48 runs of the main job's three sweeps on 2026-12-03 were such repeats, each with
  exactly its twin's nodes and validation loss, 1.5-5 minutes of a worker each) is answered
  from that run's row without pruning again: a run is a deterministic function of its
  settings (the seed is fixed; tested), so CARBS observes what the run would give. The
  row records ``repeat_of``;
- cost = mask-optimisation steps (``prune.steps``; 1 for attribution), not
  wall seconds, so runtime noise cannot shape CARBS's Pareto front. Every run
  has the same cost, so the front is the smallest circuit found.

Workers are processes; the sweep state (CARBS state + every result) is
written atomically after each observation, so a killed sweep resumes where it
stopped. The best circuit so far is written as ``prune`` writes one
(``circuit.json``, ``circuit.html``, ``config.json``), and ``sweep.png``
plots the search (the size against iteration, against cost with the Pareto
front, and against each searched value).

In-process use (what the app does)::

    sweep = Sweep(cfg, model_dir, out)
    best = sweep.run(progress=False)     # the best result row, or None when every run failed
    sweep.summary()                      # best row, iterations, failures, paths of the state, circuit, plot
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from pruning.carbs import (
    CARBS,
    CARBSParams,
    LogitSpace,
    LogSpace,
    ObservationInParam,
    Param,
)
from pruning.circuit import sweep_outcome, validation_loss, write_circuit_folder
from pruning.config import PruneConfig
from sparse_lm import config as configlib
from sparse_lm.config import field, section
from sparse_lm.io import atomic_write_text
from sparse_lm.plots import save_png

STATE_FILE = "sweep_state.json"
BEST_ORDER_FILE = "best_order.json"  # the best run's circuit and node order, measured at the end (`_finish_best`)
# Version of the sweep protocol stored in the state: a state from another protocol (e.g. costs in
# seconds, failures judged on test, collapses observed as failures, settled-above runs bisected to the end) must
# not be continued.
PROTOCOL = "sweep-protocol/4"


@dataclasses.dataclass
class SweepConfig:
    prune: PruneConfig = section(PruneConfig, "the pruning run each iteration makes (searched keys are overridden)")
    iterations: int = field(32, "pruning runs in all (paper: 32)")
    workers: int = field(1, "pruning runs at a time, each in its own process")
    objective: str = field("nodes", "what CARBS minimises: 'nodes' or 'edges' (the paper's count: weights only) "
                                    "of the circuit at the target loss on the validation split")
    seed: int = field(0, "seed of CARBS")
    num_random_samples: int = field(4, "CARBS's first suggestions, drawn around the search center")
    stop_collapsed: bool = field(
        True, "end a run whose masks collapse (the pruner's test: from a fifth of the steps on, a running mean of "
        "the masked task loss past 3/4 of the way from the model's own loss to chance) there, instead of finishing "
        "the steps and bisecting an order the masks never learned (such runs end near the whole model); CARBS "
        "observes it as a circuit of the whole model, the run is never the best")
    stop_settled_above: bool = field(
        True, "end a run whose bisection finds a count past 8 x the nodes its masks left open (+ 10) still missing "
        "the target (the masks closed too much; past the open set the order is a guess and the circuit ends near "
        "the whole model): CARBS observes it as a circuit of the whole model, the run is never the best")
    # (cost is not configurable: mask steps, see the module docstring)

    def validate(self) -> None:
        if self.objective not in ("nodes", "edges"):
            raise configlib.ConfigError(f"objective must be 'nodes' or 'edges', got {self.objective!r}")
        if self.iterations < 1 or self.workers < 1:
            raise configlib.ConfigError("iterations and workers must be >= 1")


def search_space(base: PruneConfig) -> list[Param]:
    """The six searched hyperparameters, centred on the base config's values."""
    wd = base.weight_decay if base.weight_decay > 0 else 1e-4
    return [
        Param("k_coef", LogSpace(min=1e-6, max=1e-1), search_center=base.k_coef),
        Param("lr", LogSpace(min=1e-3, max=1.0), search_center=base.lr),
        Param("weight_decay", LogSpace(min=1e-6, max=1.0), search_center=wd),
        Param("beta2", LogitSpace(min=0.5, max=0.9999), search_center=base.beta2),
        Param("heaviside_temp", LogSpace(min=1e-2, max=10.0), search_center=base.heaviside_temp),
        Param("init_noise", LogSpace(min=1e-4, max=0.5), search_center=max(base.init_noise, 1e-4)),
    ]


SEARCHED = ("k_coef", "lr", "weight_decay", "beta2", "heaviside_temp", "init_noise")


def run_cost(prune: PruneConfig) -> float:
    """CARBS's cost of one run: its mask-optimisation steps (a constant per sweep; > 0 as CARBS needs)."""
    return float(prune.steps) if prune.method == "learned" else 1.0


# -- one pruning run (in a worker process or inline) -------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(model_dir: str, threads: int) -> None:
    import multiprocessing as mp

    import torch

    from sparse_lm.loading import load_model_and_tokenizer

    torch.set_num_threads(max(1, threads))
    if mp.parent_process() is not None:  # a worker process: its bars would interleave with the parent's output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    _WORKER["model"], _WORKER["tokenizer"] = load_model_and_tokenizer(model_dir)
    _WORKER["model_dir"] = model_dir
    # In-process sweeps (one worker) reuse this dict: the previous model's task data and means must go.
    _WORKER.pop("inputs", None)
    _WORKER.pop("inputs_key", None)


def _run_one(prune_cfg: dict, out_dir: str, stop_collapsed: bool = False, stop_settled_above: bool = False) -> dict:
    from pruning.pruner import prepare_inputs, prune

    # No retries with a smaller k_coef: CARBS must see what its k_coef does.
    cfg = configlib.from_dict(PruneConfig, {**prune_cfg, "collapse_retries": 0})
    t0 = time.perf_counter()
    # The task batches and means depend on none of the searched hyperparameters: made once per worker.
    key = json.dumps([cfg.task, cfg.n_train, cfg.n_val, cfg.n_test, cfg.node_sites, cfg.mean_blocks])
    if _WORKER.get("inputs_key") != key:
        _WORKER["inputs"] = prepare_inputs(_WORKER["model"], _WORKER["tokenizer"], cfg, model_dir=_WORKER["model_dir"],
                                           fallback_dir=out_dir)
        _WORKER["inputs_key"] = key
    data, means = _WORKER["inputs"]
    # No test split, curves (as costly as the mask training) or snippets per run: only the circuit the sweep
    # keeps gets them, at the end (`_finish_best`).
    circuit = prune(_WORKER["model"], _WORKER["tokenizer"], cfg, progress=False, data=data, means=means,
                    model_dir=_WORKER["model_dir"], fallback_dir=out_dir, faithfulness=False,
                    fail_on_collapse=stop_collapsed, measure=False, stop_settled_above=stop_settled_above)
    return {"circuit": circuit.to_json(), "order_and_count": circuit.order_and_count,
            "seconds": time.perf_counter() - t0}


def _finish_one(model_dir: str, prune_cfg: dict, circuit: dict, order_and_count: tuple[list[int], int],
                out_dir: str, threads: int) -> dict:
    """The sweep's best circuit as a lone `prune` with its settings gives it (test metrics, nodes, curves)."""
    from pruning.pruner import finish_circuit

    if _WORKER.get("model_dir") != model_dir:
        _init_worker(model_dir, threads)
    cfg = configlib.from_dict(PruneConfig, {**prune_cfg, "collapse_retries": 0})
    return finish_circuit(_WORKER["model"], _WORKER["tokenizer"], cfg, circuit, order_and_count,
                          faithfulness=cfg.faithfulness_points > 0, model_dir=model_dir,
                          fallback_dir=out_dir).to_json()


# -- the sweep --------------------------------------------------------------------------


def _stopped(row: dict) -> bool:
    """A run ended early (a collapse, or a circuit settled far above its open set) that CARBS saw as the whole model."""
    return bool(row.get("collapsed") or row.get("settled_above"))


class Sweep:
    def __init__(self, cfg: SweepConfig, model_dir: str, out: Path):
        self.cfg, self.model_dir, self.out = cfg, model_dir, Path(out)
        self.state_path = self.out / STATE_FILE
        self.results: list[dict] = []
        self._whole_edges: int | None = None  # the whole model's weight edges, when a collapse needs them
        params = CARBSParams(better_direction_sign=-1, seed=cfg.seed, num_random_samples=cfg.num_random_samples,
                             is_saved_on_every_observation=False)
        self.carbs = CARBS(params, search_space(cfg.prune))
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            if state.get("protocol") != PROTOCOL:
                raise ValueError(f"{self.state_path} was written by another sweep protocol "
                                 f"({state.get('protocol') or 'before sweep-protocol/2'}: costs or failures were "
                                 f"judged differently); use another --out or delete it to start over")
            if state.get("config") != configlib.to_dict(cfg) or state.get("model") != model_dir:
                raise ValueError(f"{self.state_path} belongs to another sweep (other config or model); "
                                 f"use another --out or delete it to start over")
            self.carbs = CARBS.load_state_dict(state["carbs"])
            self.results = state["results"]
            for uuid in list(self.carbs.outstanding_suggestions):  # killed mid-run: those never came back
                self.carbs.forget_suggestion({"suggestion_uuid": uuid})

    def best(self) -> dict | None:
        ok = [r for r in self.results if not r["failed"]]
        return min(ok, key=lambda r: (r["objective"], r["iteration"])) if ok else None

    def _save_state(self) -> None:
        state = {"protocol": PROTOCOL, "model": self.model_dir, "config": configlib.to_dict(self.cfg), "results": self.results,
                 "carbs": self.carbs.get_state_dict()}
        atomic_write_text(self.state_path, json.dumps(state, indent=1) + "\n")

    def _prune_cfg(self, suggestion: dict) -> dict:
        d = configlib.to_dict(self.cfg.prune)
        d.update({k: float(suggestion[k]) for k in SEARCHED})
        return d

    def _observe(self, iteration: int, suggestion: dict, result: dict) -> dict:
        c = result["circuit"]
        objective, failed = sweep_outcome(c, self.cfg.objective)  # judged on the validation split
        cost = run_cost(self.cfg.prune)
        # A run stopped at a collapse, or once its circuit settled far above its open set, would have ended near
        # the whole model: CARBS sees that circuit.
        search = c.get("search") or {}
        collapsed = bool(c.get("failed") and search.get("stopped_at_collapse"))
        settled = bool(c.get("failed") and search.get("stopped_settled_above"))
        stopped = collapsed or settled
        seen = self._whole_model_size(c) if stopped else (objective if not failed else 0.0)
        self.carbs.observe(ObservationInParam(input=suggestion, output=seen, cost=cost,
                                              is_failure=failed and not stopped))
        reason = c.get("reason") or ""
        if failed and not c.get("failed"):
            reason = f"validation loss {validation_loss(c)} misses the target {c.get('target_loss')}"
        row = {"iteration": iteration, "params": {k: suggestion[k] for k in SEARCHED}, "failed": failed,
               "collapsed": collapsed, "settled_above": settled,
               "carbs_output": seen if not (failed and not stopped) else None,
               "objective": objective if not failed else None, "num_nodes": c.get("num_nodes"),
               "num_edges": c.get("num_edges"), "num_edges_all_links": c.get("num_edges_all_links"),
               "edges_by_type": c.get("edges_by_type"), "reason": reason, "cost": cost,
               "seconds": result["seconds"],  # recorded only; CARBS's cost is `cost`
               "target_loss": c.get("target_loss"), "val_loss": validation_loss(c),
               "test_loss": (c.get("metrics") or {}).get("circuit", {}).get("loss")}
        improved = not failed and (self.best() is None or objective < self.best()["objective"])
        if improved and result.get("order_and_count") is not None:  # what `_finish_best` needs at the end
            order, count = result["order_and_count"]
            atomic_write_text(self.out / BEST_ORDER_FILE, json.dumps(
                {"iteration": iteration, "order": list(order), "count": count, "circuit": c}) + "\n")
        self.results.append(row)
        self._save_state()
        return row

    def _finished_twin(self, suggestion: dict) -> dict | None:
        """The first finished run with exactly these searched values (all else is the sweep's fixed config)."""
        key = [float(suggestion[k]) for k in SEARCHED]
        return next((r for r in self.results if [float(r["params"][k]) for k in SEARCHED] == key), None)

    def _observe_repeat(self, iteration: int, suggestion: dict, twin: dict) -> dict:
        """A repeated suggestion, answered with its twin's outcome (CARBS sees what the run would give)."""
        failure = twin["failed"] and not _stopped(twin)
        self.carbs.observe(ObservationInParam(input=suggestion, output=0.0 if failure else twin["carbs_output"],
                                              cost=twin["cost"], is_failure=failure))
        row = {**twin, "iteration": iteration, "params": {k: suggestion[k] for k in SEARCHED}, "seconds": 0.0,
               "test_loss": None, "repeat_of": twin.get("repeat_of", twin["iteration"])}
        self.results.append(row)
        self._save_state()
        return row

    def _whole_model_size(self, c: dict) -> float:
        """The objective of a circuit of every node: nodes, or the whole model's weight edges."""
        if self.cfg.objective == "nodes":
            return float(c["total_nodes"])
        if self._whole_edges is None:
            from pruning.graph import NodeIndex, weight_edge_count
            from sparse_lm.loading import load_model_and_tokenizer

            model, _ = load_model_and_tokenizer(self.model_dir)
            self._whole_edges = weight_edge_count(model, NodeIndex.build(model, self.cfg.prune.node_sites))
        return float(self._whole_edges)

    def _finish_best(self, threads: int) -> None:
        """Measure the best circuit on test, describe it, add its curves, and write its folder; on a resume,
        once (``circuit.json`` records the sweep iteration it came from)."""
        best, path, order_path = self.best(), self.out / "circuit.json", self.out / BEST_ORDER_FILE
        if best is None or not order_path.exists():
            return
        if path.exists() and json.loads(path.read_text()).get("search", {}).get("sweep_iteration") == best["iteration"]:
            return
        saved = json.loads(order_path.read_text())
        if saved.get("iteration") != best["iteration"] or "circuit" not in saved:
            raise ValueError(f"{order_path} does not hold the best run (iteration {best['iteration']}) of "
                             f"{self.state_path}; delete both to start the sweep over")
        prune_cfg = self._prune_cfg(best["params"])
        c = _finish_one(self.model_dir, prune_cfg, saved["circuit"], (saved["order"], int(saved["count"])),
                        str(self.out), threads)
        c["search"]["sweep_iteration"] = best["iteration"]
        write_circuit_folder(c, prune_cfg, self.model_dir, self.out)
        best["test_loss"] = c["metrics"]["circuit"]["loss"]
        self._save_state()

    def run(self, progress: bool = True) -> dict | None:
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        configlib.save(self.cfg, self.out / "sweep_config.json", job="sweep")
        done = len(self.results)
        todo = self.cfg.iterations - done
        bar = tqdm(total=self.cfg.iterations, initial=done, desc="sweep", unit="run", disable=not progress)
        self._prepare_means()
        threads = max(1, (os.cpu_count() or 1) // self.cfg.workers)
        if self.cfg.workers == 1:
            _init_worker(self.model_dir, threads)
            for _ in range(todo):
                s = self.carbs.suggest().suggestion
                twin = self._finished_twin(s)
                if twin:
                    row = self._observe_repeat(len(self.results), s, twin)
                else:
                    row = self._observe(len(self.results), s, _run_one(self._prune_cfg(s), str(self.out),
                                                                       *self._stops()))
                self._tick(bar, row)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(self.cfg.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                     initargs=(self.model_dir, threads)) as pool:
                running: dict[Future, tuple[int, dict]] = {}
                launched = done
                while len(self.results) < self.cfg.iterations:
                    while len(running) < self.cfg.workers and launched < self.cfg.iterations:
                        s = self.carbs.suggest().suggestion  # pending ones are imputed, so workers differ
                        twin = self._finished_twin(s)
                        if twin:
                            self._tick(bar, self._observe_repeat(launched, s, twin))
                        else:
                            running[pool.submit(_run_one, self._prune_cfg(s), str(self.out),
                                                *self._stops())] = (launched, s)
                        launched += 1
                    if not running:
                        continue
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        it, s = running.pop(fut)
                        self._tick(bar, self._observe(it, s, fut.result()))
        bar.close()
        self._finish_best(max(1, os.cpu_count() or 1))
        plot_sweep(self.results, self.out / "sweep.png", self.cfg.objective)
        return self.best()

    def _stops(self) -> tuple[bool, bool]:
        return self.cfg.stop_collapsed, self.cfg.stop_settled_above

    def summary(self) -> dict:
        """What a caller reads after `run`: the best result row (None when every run failed; its
        ``objective``, ``num_nodes``, ``num_edges``, ``edges_by_type``, ``val_loss``, ``test_loss``,
        ``params``, ``iteration``), the number of iterations, failures and collapses (failures CARBS saw as the
        whole model), and the paths written."""
        best = self.best()
        return {"best": best, "iterations": len(self.results), "failures": sum(r["failed"] for r in self.results),
                "collapsed": sum(bool(r.get("collapsed")) for r in self.results),
                "settled_above": sum(bool(r.get("settled_above")) for r in self.results),
                "objective": self.cfg.objective, "state_file": str(self.state_path),
                "circuit": str(self.out / "circuit.json") if best is not None else None,
                "plot": str(self.out / "sweep.png")}

    @staticmethod
    def _tick(bar, row: dict) -> None:
        bar.update(1)
        bar.set_postfix(last="fail" if row["failed"] else int(row["objective"]))

    def _prepare_means(self) -> None:
        """Compute the mean activations once, in this process, so every worker finds them cached."""
        from pruning.graph import NodeIndex
        from pruning.means import load_or_compute_means
        from sparse_lm.loading import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(self.model_dir)
        index = NodeIndex.build(model, self.cfg.prune.node_sites)
        load_or_compute_means(model, index.names, tokenizer=tok, n_blocks=self.cfg.prune.mean_blocks,
                              model_dir=self.model_dir, cache_dir=self.cfg.prune.cache_dir,
                              fallback_dir=str(self.out))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, size) points no other point beats in both (cheaper or equal and smaller), by cost."""
    front: list[tuple[float, float]] = []
    for cost, size in sorted(points):
        if not front or size < front[-1][1]:
            front.append((cost, size))
    return front


def plot_sweep(results: list[dict], png: Path, objective: str) -> None:
    """Circuit size against iteration, against cost (mask steps) with the Pareto front, and per searched value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 + len(SEARCHED)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.6))
    good = [r for r in results if not r["failed"]]
    bad = [r for r in results if r["failed"] and not _stopped(r)]
    collapsed = [r for r in results if _stopped(r)]
    ob = [r["objective"] for r in good]
    top = max(ob) if ob else 1
    ax = axes[0]
    ax.plot([r["iteration"] for r in good], ob, "o", label="circuit (meets target on val)")
    best, running = [], math.inf
    for r in results:
        if not r["failed"]:
            running = min(running, r["objective"])
        best.append(running)
    ax.step([r["iteration"] for r in results], best, where="post", label="best so far")
    ax.plot([r["iteration"] for r in bad], [top] * len(bad), "rx", label="failed (val)")
    ax.plot([r["iteration"] for r in collapsed], [top] * len(collapsed), "v", color="tab:orange",
            label="collapsed or settled above (CARBS: the whole model)")
    ax.set(xlabel="iteration", ylabel=f"circuit {objective}", title="CARBS search")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot([r["cost"] for r in good], ob, "o", alpha=0.6, label="circuit")
    front = pareto_front([(r["cost"], r["objective"]) for r in good])
    if front:
        ax.step([c for c, _ in front], [o for _, o in front], "k-", where="post", marker="*", ms=10,
                label="Pareto front")
    ax.plot([r["cost"] for r in bad], [top] * len(bad), "rx", label="failed")
    ax.plot([r["cost"] for r in collapsed], [top] * len(collapsed), "v", color="tab:orange", label="collapsed")
    ax.set(xlabel="cost (mask steps)", ylabel=f"circuit {objective}", title="size by cost")
    ax.legend(fontsize=8)
    for ax, key in zip(axes[2:], SEARCHED):
        ax.plot([r["params"][key] for r in good], ob, "o")
        ax.plot([r["params"][key] for r in bad], [top] * len(bad), "rx")
        ax.plot([r["params"][key] for r in collapsed], [top] * len(collapsed), "v", color="tab:orange")
        ax.set(xscale="log" if key != "beta2" else "linear", xlabel=key)
    fig.tight_layout()
    save_png(fig, png, dpi=90)
