"""Ground truth for the pruner: transformers compiled from RASP programs with tracr.

A researcher scores their own RASP program in four lines::

    from tracr.rasp import rasp
    from pruning.groundtruth import compile_program, prune_compiled, score

    program = rasp.numerical(...)  # or any categorical rasp.SOp, e.g. tracr.compiler.lib.make_hist()
    compiled = compile_program(program, vocab={"a", "b", "c"}, max_seq_len=5)
    circuit = prune_compiled(compiled, method="learned")
    print(score(circuit, compiled.ground_truth))   # node/edge precision and recall, roc_auc

`compiled.model` is a torch model with the toolkit's named sites (``sites.record`` /
``sites.replace``); `compiled.task` holds every input (or 1,000 sampled ones) and the
program's class at each answered position; `compiled.ground_truth` is the known circuit
(`truth.GroundTruth`). `rotate(compiled)` gives the basis-free variant. jax and tracr are
imported only when a program is compiled (the ``groundtruth`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from pruning.groundtruth.compile import (
    TracrModel,
    build_task,
    compile_tracr,
    input_space,
    to_torch,
)
from pruning.groundtruth.programs import PROGRAMS, ProgramSpec, get_program
from pruning.groundtruth.score import roc_auc, score
from pruning.groundtruth.task import IGNORE, SequenceTask, sequence_task_loss
from pruning.groundtruth.torch_model import (
    TracrConfig,
    TracrTransformer,
    rotate_residual,
)
from pruning.groundtruth.truth import (
    BASIS_FREE_KINDS,
    NODE_KINDS,
    PRUNE_KINDS,
    ROTATED_KINDS,
    GroundTruth,
    derive_ground_truth,
    means_of,
    record_real,
)

__all__ = [
    "BASIS_FREE_KINDS",
    "IGNORE",
    "NODE_KINDS",
    "PROGRAMS",
    "PRUNE_DEFAULTS",
    "PRUNE_KINDS",
    "REFINE",
    "ROTATED_KINDS",
    "SELECT_ON_ALL",
    "TIE_BREAK_ATTRIBUTION",
    "Compiled",
    "GroundTruth",
    "ProgramSpec",
    "SequenceTask",
    "TracrConfig",
    "TracrTransformer",
    "compile_program",
    "compile_registered",
    "prune_compiled",
    "roc_auc",
    "rotate",
    "score",
    "sequence_task_loss",
    "task_means",
]


@dataclass
class Compiled:
    """A compiled program: the torch model, its task, its known circuit, and what tracr made."""

    name: str
    model: TracrTransformer
    task: SequenceTask
    ground_truth: GroundTruth
    tracr: TracrModel | None = None
    rotated: bool = False

    @property
    def program(self) -> Any:
        return self.tracr.program if self.tracr is not None else None


def compile_program(program: Any, vocab: Iterable[Any], max_seq_len: int, compiler_bos: str = "BOS",
                    inputs: Sequence[Sequence[Any]] | None = None, *, name: str | None = None, min_len: int = 1,
                    logit_scale: float = 10.0, seed: int = 0) -> Compiled:
    """Compile a categorical RASP program with tracr; return its torch model, task and ground truth.

    inputs: the input sequences (no BOS) of the task; None: every sequence of min_len..max_seq_len
    tokens when there are at most 4,096 of them, else 1,000 distinct random ones (`seed`).
    """
    vocab = list(vocab)
    tm = compile_tracr(program, vocab, max_seq_len, compiler_bos)
    if not tm.categorical:
        raise ValueError(f"program {program.label!r} has a numerical output; the ground-truth task needs a "
                         "categorical one (one class per output value): wrap it, e.g. "
                         "rasp.categorical(rasp.Map(round, program))")
    model = to_torch(tm, logit_scale=logit_scale)
    if inputs is None:
        inputs = input_space(vocab, max_seq_len, min_len=min_len, seed=seed)
    task = build_task(tm, inputs)
    if not bool(task.answered.any()):
        raise ValueError("the program gives no answer (only None) on these inputs: nothing to prune for")
    truth = derive_ground_truth(model, task, kinds=PRUNE_KINDS)
    return Compiled(name or str(program.label), model, task, truth, tm)


def compile_registered(name: str, **kwargs: Any) -> Compiled:
    """A program of the registry (`PROGRAMS`), compiled with its vocabulary, length and inputs."""
    spec = get_program(name)
    vocab = list(spec.vocab)
    inputs = kwargs.pop("inputs", None)
    if inputs is None:
        inputs = input_space(vocab, spec.max_seq_len, min_len=spec.min_len, accept=spec.accept,
                             seed=kwargs.get("seed", 0))
    return compile_program(spec.build(), vocab, spec.max_seq_len, inputs=inputs, name=name, **kwargs)


def rotate(compiled: Compiled, seed: int = 0) -> Compiled:
    """The basis-free variant: the residual stream turned by a random orthogonal matrix.

    Outputs, q/k/v channels, attention outputs and MLP neurons are unchanged; residual
    channels no longer line up with program variables, so the candidate nodes are only the
    kinds that do not live in the residual (`ROTATED_KINDS`: heads' q/k/v channels, MLP neurons).
    The ground truth is derived again for that candidate set (on the unrotated model, which has the
    same channels): under mean ablation a channel's role depends on which others are ablated, and here
    the residual-side channels stay intact.
    """
    if compiled.rotated:
        raise ValueError(f"{compiled.name} is already rotated; rotate the unrotated compiled program")
    truth = derive_ground_truth(compiled.model, compiled.task, kinds=ROTATED_KINDS)
    return replace(compiled, name=f"{compiled.name}-rotated", model=rotate_residual(compiled.model, seed),
                   ground_truth=truth, rotated=True)


def task_means(compiled: Compiled, sites: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Mean of each site over every real position (BOS included) of the task inputs: the ablation values."""
    names = list(sites) if sites is not None else compiled.model.sites.names()
    return {n: m.float() for n, m in means_of(record_real(compiled.model, compiled.task, names)).items()}


# The pruner's settings for compiled programs (any PruneConfig field; `prune_compiled` overrides win).
# A compiled model answers every input exactly, so the target is its own loss plus a margin far below what
# one flipped answer costs (~logit_scale nats on one position: >= 0.02 on a 100-input split); 0.01 let the
# bisection drop truth nodes whose ablation only lowers the answers' confidence.
# Learned masks train through smooth surrogate gradients of the compiled MLPs and attention patterns
# (`TracrTransformer.surrogate_gradients`: (mlp_temp, attn_temp)); attribution keeps the exact gradient.
SURROGATE: tuple[float | None, float | None] = (1.0, 10.0)
# After the bisection, drop the kept nodes one at a time (last layer first) while the circuit keeps the target loss
# and the full model's accuracy (`pruning.objective.drop_one_by_one`), for both methods. The bisection keeps every
# node up to the last one the target needs in the method's order, so nodes ranked early but not needed (the second
# neuron of a step pair, a head's q/k that a mean replaces) stay in; this removes them. Its fixed order and its
# criterion are the ground truth's step 4 (`truth._drop_unused_channels`), so where several minimal circuits exist
# both pick the same one. None: the pruner's bisection alone.
REFINE: str | None = "reverse_forward"
# The bisection and the refine step judge a circuit on every task input (the validation split is the whole task),
# not on a quarter of it: the ground truth is a statement about every input, and a channel one rare input needs
# (the output value "5" of count_a, produced by one input in 363) is invisible to a split that lacks that input.
# The masks (and attribution scores) still come from the train split; the test metrics are then not held out.
SELECT_ON_ALL = True
# Learned masks: nodes of equal tau (many sit at the clamp, -1) are ordered by their attribution score (exact
# gradient, train split) before the masks' running importance, which is zero where the loss went flat.
TIE_BREAK_ATTRIBUTION = True
PRUNE_DEFAULTS: dict[str, Any] = {
    "relative_margin": 0.001,
    # Every mask starts fully open and moves slowly: the compiled model's first-order signal says closing
    # one neuron of a discretising pair helps, so the nodes the program needs close, break the answer and are
    # pushed open again, oscillating around tau = 0, while the nodes it ignores (no task gradient) drift
    # to the clamp at -1. The order by tau separates the two even though the training loss stays high, so
    # the collapse retries (which read that loss) are off.
    "init_value": 1.0,
    "lr": 0.01,
    "k_coef": 3e-3,
    "steps": 300,
    "batch_size": 64,
    "collapse_retries": 0,
    "device": "cpu",
    "snippets": 0,
}


def prune_compiled(compiled: Compiled, method: str = "learned", *, progress: bool = False,
                   split_seed: int = 0, temperature: float | None = None,
                   surrogate: tuple[float | None, float | None] | None = SURROGATE, refine: str | None = REFINE,
                   tie_break_attribution: bool = TIE_BREAK_ATTRIBUTION, select_on_all: bool = SELECT_ON_ALL,
                   **prune_overrides: Any) -> Any:
    """Prune the compiled model for its task with the toolkit's pruner; return the `Circuit`.

    The task's inputs are split train / val / test (1/2, 1/4, 1/4, shuffled with `split_seed`):
    masks (or attribution scores) from train, the node count bisected on val, metrics on test.
    Nodes are mean-ablated to their mean over the task's inputs (`task_means`). `prune_overrides`
    are `PruneConfig` fields over `PRUNE_DEFAULTS` (e.g. ``steps=500, k_coef=1e-3``); the candidate
    node sites default to the ground truth's node kinds without ``attn.y`` (it equals ``attn.v``
    mixed by the pattern: the pruner's default node kinds). The circuit's ``search["node_scores"]``
    orders every candidate node (for `score`'s ROC-AUC).

    temperature: the training and attribution losses read logits / temperature (None: the model's
    logit scale, i.e. tracr's own 0/1 outputs). surrogate: (mlp_temp, attn_temp) of the smooth
    gradients learned masks train through (`TracrTransformer.surrogate_gradients`; None: exact).
    refine: after the bisection, drop kept nodes one at a time while the validation loss keeps the
    target and the accuracy the full model's (`pruning.objective.drop_one_by_one`; both methods alike;
    default `REFINE`, None: off). select_on_all: the validation split (bisection, refine) is every task
    input (`SELECT_ON_ALL`); False: the held-out quarter.
    """
    from pruning.config import PruneConfig
    from pruning.objective import SequenceObjective, node_attribution, prune_objective

    settings = {**PRUNE_DEFAULTS, **prune_overrides, "method": method}
    settings.setdefault("node_sites", [k for k in compiled.ground_truth.node_kinds if k != "attn.y"])
    unknown = sorted(set(settings) - set(PruneConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown pruner settings {unknown}; see pruning.config.PruneConfig")
    cfg = PruneConfig(**{**settings, "task": compiled.name})
    if temperature is None:  # train on tracr's own 0/1 outputs: unsaturated, so the gradients inform
        temperature = float(compiled.model.config.logit_scale)
    objective = SequenceObjective.from_task(compiled.task, compiled.name, seed=split_seed, temperature=temperature)
    if select_on_all:
        objective = replace(objective, val=compiled.task)
    means = task_means(compiled)
    tie = None
    if method == "learned" and tie_break_attribution:  # exact gradients, outside the surrogate
        tie = node_attribution(compiled.model, objective, cfg, means)
    if method != "learned" or surrogate is None:
        circuit = prune_objective(compiled.model, objective, cfg, means, name=compiled.name, progress=progress,
                                  refine=refine, tie_break=tie)
    else:
        with compiled.model.surrogate_gradients(*surrogate):  # forward passes stay exact
            circuit = prune_objective(compiled.model, objective, cfg, means, name=compiled.name, progress=progress,
                                      refine=refine, tie_break=tie)
        circuit.search["surrogate_gradients"] = {"mlp_temp": surrogate[0], "attn_temp": surrogate[1]}
    circuit.search["selection"] = ("every task input (the test split is inside it)" if select_on_all
                                   else "the validation split")
    if select_on_all and circuit.verification.get("note"):  # its "test split" numbers were seen by the selection
        circuit.verification["note"] = ("not held out: the bisection chose on every input, this test split "
                                        "included; " + circuit.verification["note"])
    return circuit
