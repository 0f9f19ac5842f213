"""The known circuit of a compiled program, in the toolkit's node vocabulary.

A node is one channel of one site (``"1.attn.v"`` channel 3), exactly as in
`pruning.graph.NodeIndex`; an edge is a nonzero weight between two nodes as in
`pruning.graph.circuit_edges`. The ground truth is derived in five steps:

1. Structure. tracr gives each RASP expression its own residual dimensions
   (``label:value``) and one block: a head, or a group of MLP neurons that
   write that expression's dimensions. A component is a head with nonzero value
   and output weights, or the group of live neurons (nonzero input and output
   weights) that write one variable. Its channels are the ones its weights use:
   a q channel whose row and whose paired k row are nonzero, a v (and y) channel
   whose value row and output column are nonzero, the residual channels its
   nonzero weights read (``act_in``) and write (``resid_delta``). Padding heads,
   padding neurons and empty layers have zero weights and never appear.
2. Variation. A channel whose value is the same at every real position of every
   input (the ``one`` direction, ``tokens:compiler_pad``, an output value the
   inputs never produce, a q channel that only reads ``one``) carries no
   information: replacing it by its mean changes nothing, so no pruner can or
   should keep it. Such channels are left out.
3. Function. Components are dropped, last layer first, while mean-ablating the
   dropped set (a head's values, an MLP group's neurons: the component then writes a
   constant) keeps the answers at every answered position of every input: what tracr
   compiled but the output does not use.
4. Channels. Within the kept components, single channels are dropped, last first, while
   mean-ablating them too (with everything outside the truth ablated) leaves every answer
   unchanged (`_drop_unused_channels`): channels a component reads or computes that no
   answered position needs (``channels=False`` keeps them).
5. Alternatives. A truth channel that a step-4 channel of the same site can replace (the
   swapped set keeps the answers too) is recorded with it (`GroundTruth.alternatives`):
   the two circuits are equally small and equally right, and `score` credits either.
   Where a swap lets step 4 drop more channels, the smaller circuit becomes the truth
   and the search repeats (`_swap_and_drop`).

"The answers are kept" has one meaning throughout (`AnswerJudge`): at every answered position
of every task input the program's class still wins by a clear margin, and the task loss stays
within the pruner's own margin of the intact model's. Nodes are ablated exactly as the pruner
ablates them: the candidate node kinds only (`PRUNE_KINDS`; `ROTATED_KINDS` for the rotated
variant, whose residual-side channels stay intact), each to its mean over the task inputs.
Mean ablation is not monotone (a channel at its mean can be harmless with its reader exact and
harmful with its reader at its mean too), so the truth is derived for the candidate set the
pruner uses, not restricted from a larger one.

The result is checked for sufficiency: with every other candidate node mean-ablated
(means over all real positions of the task inputs, the way the pruner forms
them), the model still gives the program's answers (`GroundTruth.sufficient`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pruning.groundtruth.task import SequenceTask, sequence_task_loss
from pruning.groundtruth.torch_model import TracrTransformer

# Per layer, in forward order (`pruning.graph.FORWARD_ORDER`).
NODE_KINDS = ["attn.act_in", "attn.q", "attn.k", "attn.v", "attn.y", "attn.resid_delta", "mlp.act_in", "mlp.post_act",
              "mlp.resid_delta"]
# The kinds whose channels do not live in the residual basis: the ones a rotation leaves aligned.
BASIS_FREE_KINDS = ["attn.q", "attn.k", "attn.v", "attn.y", "mlp.post_act"]
# The candidate kinds of the pruner (its default node kinds: ``attn.y`` is ``attn.v`` mixed by the pattern), and
# those of the rotated variant (the residual-side kinds no longer line up with program variables).
PRUNE_KINDS = [k for k in NODE_KINDS if k != "attn.y"]
ROTATED_KINDS = [k for k in BASIS_FREE_KINDS if k != "attn.y"]
CONSTANT_TOL = 1e-5
# `AnswerJudge`: the answers are kept when, at every answered position, the program's class still beats every
# other by at least this share of the intact model's margin (tracr answers with one-hot outputs: margin 1 x
# logit_scale): the pruner's "accuracy at the full model's", without ties or near-ties that rounding decides ...
ANSWER_MARGIN = 0.1
# ... and the task loss (nats per answered position) grows by at most this, the size of the pruner's margin over
# its own loss (`PRUNE_DEFAULTS["relative_margin"]`).
CHANNEL_LOSS_TOL = 1e-3

Node = tuple[str, int]  # (site name, channel)
EdgeKey = tuple[Node, Node]


@dataclass
class GroundTruth:
    """The nodes and edges a program's output depends on, and the candidate sites they are drawn from."""

    nodes: set[Node]
    edges: set[EdgeKey]
    site_widths: dict[str, int]  # every candidate site (node_kinds x layers), in forward order
    node_kinds: list[str]
    components: list[dict[str, Any]] = field(default_factory=list)  # each head / MLP group and why kept or not
    structural_nodes: set[Node] = field(default_factory=set)  # step 1 only (before variation and function)
    sufficient: dict[str, float] = field(default_factory=dict)  # accuracy with everything else mean-ablated
    unused_channels: set[Node] = field(default_factory=set)  # step 4: channels of kept components no answer needs
    # step 5: truth node -> channels of the same site that can take its place (the truth with the swap still keeps
    # the answers): an equally small circuit, so `score` credits either
    alternatives: dict[Node, list[Node]] = field(default_factory=dict)

    @property
    def total_nodes(self) -> int:
        return sum(self.site_widths.values())

    def all_nodes(self) -> list[Node]:
        """Every candidate node in forward order (the order of `pruning.graph.NodeIndex`)."""
        return [(s, c) for s, w in self.site_widths.items() for c in range(w)]

    def restrict(self, kinds: list[str]) -> GroundTruth:
        """The same truth over fewer node kinds (e.g. `BASIS_FREE_KINDS` for a rotated model)."""
        keep = {s for s in self.site_widths if s.split(".", 1)[1] in kinds}
        return GroundTruth(nodes={n for n in self.nodes if n[0] in keep},
                           edges={e for e in self.edges if e[0][0] in keep and e[1][0] in keep},
                           site_widths={s: w for s, w in self.site_widths.items() if s in keep},
                           node_kinds=[k for k in self.node_kinds if k in kinds], components=self.components,
                           structural_nodes={n for n in self.structural_nodes if n[0] in keep},
                           sufficient=self.sufficient,
                           unused_channels={n for n in self.unused_channels if n[0] in keep},
                           alternatives={n: a for n, a in self.alternatives.items() if n[0] in keep})

    def by_site(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {s: [] for s in self.site_widths}
        for s, c in sorted(self.nodes):
            out[s].append(c)
        return {s: cs for s, cs in out.items() if cs}

    def to_json(self) -> dict[str, Any]:
        return {"node_kinds": self.node_kinds, "site_widths": self.site_widths, "num_nodes": len(self.nodes),
                "num_edges": len(self.edges), "total_nodes": self.total_nodes, "nodes": self.by_site(),
                "edges": sorted([list(a) + list(b) for a, b in self.edges]),
                "components": self.components, "sufficient": self.sufficient,
                "num_structural_nodes": len(self.structural_nodes), "num_unused_channels": len(self.unused_channels),
                "alternatives": [[list(n), [list(a) for a in alts]] for n, alts in sorted(self.alternatives.items())]}


# ---------------------------------------------------------------------------- weights and activations


@dataclass
class _Layer:
    q: torch.Tensor  # (H*dk, d) (out, in)
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor  # (d, H*dk)
    fc: torch.Tensor  # (m, d)
    fc_b: torch.Tensor  # (m,)
    proj: torch.Tensor  # (d, m)


def _layers(model: TracrTransformer) -> list[_Layer]:
    out = []
    d_attn = model.config.n_head * model.config.d_head
    for block in model.transformer.h:
        q, k, v = block.attn.c_attn.weight.detach().double().split(d_attn, dim=0)
        out.append(_Layer(q, k, v, block.attn.c_proj.weight.detach().double(),
                          block.mlp.c_fc.weight.detach().double(), block.mlp.c_fc.bias.detach().double(),
                          block.mlp.c_proj.weight.detach().double()))
    return out


def _sites(model: TracrTransformer, kinds: list[str]) -> dict[str, int]:
    return {f"{i}.{k}": model.sites.width(f"{i}.{k}") for i in range(model.config.n_layer) for k in kinds}


@torch.no_grad()
def record_real(model: TracrTransformer, task: SequenceTask, names: list[str]) -> dict[str, torch.Tensor]:
    """Each site's values at the real positions (BOS included, padding not): {name: (n_positions, width)}."""
    real = torch.arange(task.input_ids.shape[1])[None, :] < task.lengths[:, None]  # (B, T)
    with model.sites.record(names) as acts:
        model(task.input_ids)
    return {n: a[real].double() for n, a in acts.items()}


def means_of(acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: a.mean(0) for n, a in acts.items()}


@torch.no_grad()
def predictions(model: TracrTransformer, task: SequenceTask, ablate: dict[str, torch.Tensor] | None = None,
                means: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Argmax class per position with the channels in ``ablate`` ({site: (width,) bool}) set to their means."""
    fns = {}
    for name, mask in (ablate or {}).items():
        if bool(mask.any()):
            m = means[name].to(torch.float32)  # type: ignore[index]
            fns[name] = (lambda x, mask=mask, m=m: torch.where(mask, m.to(x.dtype), x))
    with model.sites.replace(fns):
        return model(task.input_ids).logits.argmax(-1)


def _agrees(pred: torch.Tensor, reference: torch.Tensor, task: SequenceTask) -> float:
    """Share of rows whose every answered position matches the reference answer."""
    answered = task.answered
    return float(((pred == reference) | ~answered).all(1).float().mean())


# ---------------------------------------------------------------------------- the criterion


class AnswerJudge:
    """Whether the model, with some channels mean-ablated, still gives the program's answers.

    The one criterion of the derivation (steps 3 and 4) and of its sufficiency check: at every
    answered position of every task input the program's class beats every other class by at least
    `ANSWER_MARGIN` of the intact model's margin there, and the mean task loss (cross-entropy over the
    answered positions, the pruner's loss) is within `CHANNEL_LOSS_TOL` of the intact model's (the
    pruner's target is its own loss plus a margin of the same size). An argmax alone is not enough:
    a channel replaced by a small mean can leave its class first by a hair, or in a tie that rounding
    breaks one way in one basis and the other way in a rotated one.
    """

    def __init__(self, model: TracrTransformer, task: SequenceTask, means: dict[str, torch.Tensor]):
        self.model, self.task, self.means = model, task, means
        self.answered = task.answered
        self.classes = task.targets.clamp(min=0)  # (B, T): IGNORE positions get class 0, never read
        logits = self._logits({})
        self.full_margin = self._margin(logits)  # (B, T)
        self.full_loss = float(sequence_task_loss(logits, task.targets)[0])
        self.evaluations = 0

    @torch.no_grad()
    def _logits(self, ablate: dict[str, torch.Tensor]) -> torch.Tensor:
        fns = {}
        for name, mask in ablate.items():
            if bool(mask.any()):
                m = self.means[name].to(torch.float32)
                fns[name] = (lambda x, mask=mask, m=m: torch.where(mask, m.to(x.dtype), x))
        with self.model.sites.replace(fns):
            return self.model(self.task.input_ids).logits.double()

    def _margin(self, logits: torch.Tensor) -> torch.Tensor:
        right = logits.gather(-1, self.classes[..., None])[..., 0]  # (B, T)
        others = logits.scatter(-1, self.classes[..., None], float("-inf")).max(-1).values  # (B, T)
        return right - others

    def measure(self, ablate: dict[str, torch.Tensor]) -> dict[str, float]:
        """{"margin": the least share of the intact margin left at an answered position, "loss_increase": ...}."""
        self.evaluations += 1
        logits = self._logits(ablate)
        share = (self._margin(logits) / self.full_margin.clamp(min=1e-12))[self.answered]
        loss = float(sequence_task_loss(logits, self.task.targets)[0])
        return {"margin": float(share.min()), "loss_increase": loss - self.full_loss}

    def keeps(self, ablate: dict[str, torch.Tensor]) -> bool:
        got = self.measure(ablate)
        return got["margin"] >= ANSWER_MARGIN and got["loss_increase"] <= CHANNEL_LOSS_TOL


# ---------------------------------------------------------------------------- the derivation


def derive_ground_truth(model: TracrTransformer, task: SequenceTask, *, kinds: list[str] | None = None,
                        functional: bool = True, channels: bool = True) -> GroundTruth:
    """The ground truth of an unrotated compiled model over the candidate node ``kinds`` (see the module docstring).

    kinds: the node kinds a pruner may ablate (default `PRUNE_KINDS`; `ROTATED_KINDS` for the rotated
    variant, whose residual channels stay intact). Under mean ablation what a channel is needed for depends
    on which other channels are ablated, so the truth is derived for the same candidate set the pruner uses.
    """
    kinds = list(kinds or PRUNE_KINDS)
    cfg = model.config
    H, dk = cfg.n_head, cfg.d_head
    labels = cfg.residual_labels
    if len(labels) != cfg.d_model or labels[0].startswith("rot:"):
        raise ValueError("derive the ground truth on the unrotated model; a rotated one reuses it "
                         "(derive_ground_truth(unrotated_model, task, kinds=ROTATED_KINDS))")
    unknown = [k for k in kinds if k not in NODE_KINDS]
    if unknown:
        raise ValueError(f"unknown node kinds {unknown}; choose from {NODE_KINDS}")
    variable = [lab.split(":", 1)[0] for lab in labels]
    layers = _layers(model)
    all_sites = _sites(model, NODE_KINDS)
    acts = record_real(model, task, list(all_sites))
    means = means_of(acts)
    varies = {n: (a.max(0).values - a.min(0).values) > CONSTANT_TOL for n, a in acts.items()}  # {site: (width,)}
    judge = AnswerJudge(model, task, means)

    # -- step 1: components and the channels their weights use
    components: list[dict[str, Any]] = []
    for i, w in enumerate(layers):
        for h in range(H):
            sl = slice(h * dk, (h + 1) * dk)
            q_used = (w.q[sl] != 0).any(1) & (w.k[sl] != 0).any(1)  # (dk,): the channel enters the score
            v_used = (w.v[sl] != 0).any(1) & (w.o[:, sl] != 0).any(0)  # (dk,): the channel reaches the output
            if not bool(v_used.any()):
                continue  # a padding head (or one that writes nothing)
            ch = {}
            qc = torch.zeros(H * dk, dtype=torch.bool)
            qc[sl] = q_used
            vc = torch.zeros(H * dk, dtype=torch.bool)
            vc[sl] = v_used
            ch[f"{i}.attn.q"] = qc
            ch[f"{i}.attn.k"] = qc.clone()
            ch[f"{i}.attn.v"] = vc
            ch[f"{i}.attn.y"] = vc.clone()
            reads = torch.cat([w.q[qc], w.k[qc], w.v[vc]]) != 0  # (used rows, d)
            ch[f"{i}.attn.act_in"] = reads.any(0)
            ch[f"{i}.attn.resid_delta"] = (w.o[:, vc] != 0).any(1)
            writes = sorted({variable[j] for j in ch[f"{i}.attn.resid_delta"].nonzero().flatten().tolist()})
            # a head with its values at their means writes a constant whatever its pattern: the head removed
            components.append({"kind": "head", "layer": i, "head": h, "writes": writes, "channels": ch,
                               "ablate": {f"{i}.attn.v": vc}})
        live = ((w.fc != 0).any(1) | (w.fc_b != 0)) & (w.proj != 0).any(0)  # (m,)
        groups: dict[str, torch.Tensor] = {}
        for n in live.nonzero().flatten().tolist():
            written = sorted({variable[j] for j in (w.proj[:, n] != 0).nonzero().flatten().tolist()})
            key = ",".join(written)
            groups.setdefault(key, torch.zeros(w.fc.shape[0], dtype=torch.bool))[n] = True
        for key, neurons in groups.items():
            ch = {f"{i}.mlp.post_act": neurons, f"{i}.mlp.act_in": (w.fc[neurons] != 0).any(0),
                  f"{i}.mlp.resid_delta": (w.proj[:, neurons] != 0).any(1)}
            components.append({"kind": "mlp", "layer": i, "writes": key.split(","), "channels": ch,
                               "ablate": {f"{i}.mlp.post_act": neurons}})

    # -- step 3: drop components the answers do not need (last first, cumulatively)
    dropped: dict[str, torch.Tensor] = {}
    for comp in reversed(components):
        comp["kept"] = True
        comp["reason"] = "needed"
        if not functional:
            continue
        trial = {n: m.clone() for n, m in dropped.items()}
        for n, m in comp["ablate"].items():
            trial[n] = trial.get(n, torch.zeros_like(m)) | m
        if judge.keeps(trial):
            comp["kept"] = False
            comp["reason"] = "output unchanged when mean-ablated"
            dropped = trial

    # -- steps 1 + 2: the nodes
    structural: set[Node] = set()
    nodes: set[Node] = set()
    for comp in components:
        for site, mask in comp["channels"].items():
            for c in mask.nonzero().flatten().tolist():
                structural.add((site, c))
                if comp["kept"] and bool(varies[site][c]):
                    nodes.add((site, c))
    nodes = {n for n in nodes if n[0].split(".", 1)[1] in kinds}
    structural = {n for n in structural if n[0].split(".", 1)[1] in kinds}
    site_widths = _sites(model, kinds)
    redundant: set[Node] = set()
    alternatives: dict[Node, list[Node]] = {}
    if functional and channels:
        nodes, redundant = _drop_unused_channels(judge, nodes, site_widths)
        nodes, redundant, alternatives = _swap_and_drop(judge, nodes, redundant, site_widths)
    edges = truth_edges(model, nodes, site_widths)

    # -- sufficiency: every candidate node outside the truth mean-ablated (other sites intact)
    reference = task.targets.clone()
    reference[~task.answered] = -1
    ablate = _outside(nodes, site_widths)
    check = judge.measure(ablate)
    suff = _agrees(predictions(model, task, ablate, means), reference, task)
    full = _agrees(predictions(model, task), reference, task)
    public = [{k: v for k, v in c.items() if k not in ("channels", "ablate")} for c in components]
    return GroundTruth(nodes=nodes, edges=edges, site_widths=site_widths, node_kinds=kinds, components=public,
                       structural_nodes=structural,
                       sufficient={"full_model": full, "truth_only": suff, "margin": round(check["margin"], 4),
                                   "loss_increase": round(check["loss_increase"], 6),
                                   "keeps_answers": float(judge.keeps(ablate))},
                       unused_channels=redundant, alternatives=alternatives)


def _outside(nodes: set[Node], site_widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """{site: (width,) bool}: every candidate channel not in `nodes` (the ones to mean-ablate)."""
    ablate = {st: torch.ones(wd, dtype=torch.bool) for st, wd in site_widths.items()}
    for st, c in nodes:
        ablate[st][c] = False
    return ablate


def _drop_unused_channels(judge: AnswerJudge, nodes: set[Node], site_widths: dict[str, int]
                          ) -> tuple[set[Node], set[Node]]:
    """Step 4: drop single channels of kept components that no answer needs, last first, cumulatively.

    With every candidate node outside the truth mean-ablated (the way a pruner judges a circuit), a
    channel is dropped when ablating it too still keeps the answers (`AnswerJudge`): e.g. the query
    channel of position 0 in a head whose answer at position 0 is None, or a key channel whose every
    value selects the same keys. What is left keeps the answers and no single channel of it can go.
    """
    ablate = _outside(nodes, site_widths)
    kind_rank = {k: i for i, k in enumerate(NODE_KINDS)}
    order = sorted(nodes, key=lambda n: (int(n[0].split(".")[0]), kind_rank.get(n[0].split(".", 1)[1], 99), n[1]),
                   reverse=True)
    dropped: set[Node] = set()
    for st, c in order:
        ablate[st][c] = True
        if judge.keeps(ablate):
            dropped.add((st, c))
        else:
            ablate[st][c] = False
    return nodes - dropped, dropped


def _alternatives(judge: AnswerJudge, nodes: set[Node], redundant: set[Node], site_widths: dict[str, int]
                  ) -> dict[Node, list[Node]]:
    """Step 5: for each truth channel, the step-4 channels of the same site that can take its place.

    Mean ablation often leaves two channels of one head or MLP interchangeable: either one alone keeps the
    answers (e.g. two query channels whose means each leave the pattern intact when the other is exact).
    Step 4's fixed order keeps one; a pruner may keep the other and is just as right: both circuits keep
    the answers and are equally small. Each swap is checked on its own (the truth with that one channel
    swapped keeps the answers, `AnswerJudge`); only step-4 channels of the same site are tried.
    """
    out: dict[Node, list[Node]] = {}
    for n in sorted(nodes):
        for a in sorted(r for r in redundant if r[0] == n[0]):
            if judge.keeps(_outside((nodes - {n}) | {a}, site_widths)):
                out.setdefault(n, []).append(a)
    return out


def _swap_and_drop(judge: AnswerJudge, nodes: set[Node], redundant: set[Node], site_widths: dict[str, int]
                   ) -> tuple[set[Node], set[Node], dict[Node, list[Node]]]:
    """Step 5: the alternatives of the truth channels, taking any swap after which more channels can go.

    Step 4 is greedy: what it leaves keeps the answers and no single channel of it can go, but a swap
    of one channel for an interchangeable one can let others go too (a query channel whose mean fits
    the pattern better, so the MLP neurons that fed the other become unused). The truth is then the
    smaller circuit, and the search repeats until no swap shrinks it.
    """
    while True:
        alternatives = _alternatives(judge, nodes, redundant, site_widths)
        smaller = None
        for n, alts in alternatives.items():
            for a in alts:
                kept, gone = _drop_unused_channels(judge, (nodes - {n}) | {a}, site_widths)
                if len(kept) < len(nodes):
                    smaller = kept, (redundant | {n} | gone) - kept  # `a` stays unused when it went too
                    break
            if smaller:
                break
        if smaller is None:
            return nodes, redundant, alternatives
        nodes, redundant = smaller


def truth_edges(model: TracrTransformer, nodes: set[Node], site_widths: dict[str, int]) -> set[EdgeKey]:
    """Edges among `nodes` as `pruning.graph.circuit_edges` defines them (nonzero weights, in forward order)."""
    layers = _layers(model)
    by_site: dict[str, list[int]] = {}
    for s, c in nodes:
        by_site.setdefault(s, []).append(c)
    edges: set[EdgeKey] = set()

    def matrix(src: str, dst: str, w: torch.Tensor) -> None:  # W[j, i] != 0: src i -> dst j
        for i in by_site.get(src, []):
            for j in by_site.get(dst, []):
                if w[j, i] != 0:
                    edges.add(((src, i), (dst, j)))

    writers: list[str] = []
    for L, w in enumerate(layers):
        p = f"{L}."
        for reader in (p + "attn.act_in", p + "mlp.act_in"):
            for writer in writers:  # the residual stream: a write reaches every later read of the same channel
                for c in set(by_site.get(writer, [])) & set(by_site.get(reader, [])):
                    edges.add(((writer, c), (reader, c)))
            if reader.endswith("attn.act_in"):
                for n, m in (("q", w.q), ("k", w.k), ("v", w.v)):
                    matrix(reader, p + f"attn.{n}", m)
                for c in set(by_site.get(p + "attn.q", [])) & set(by_site.get(p + "attn.k", [])):
                    edges.add(((p + "attn.q", c), (p + "attn.k", c)))
                matrix(p + "attn.v", p + "attn.resid_delta", w.o)
                writers.append(p + "attn.resid_delta")
            else:
                matrix(reader, p + "mlp.post_act", w.fc)
                matrix(p + "mlp.post_act", p + "mlp.resid_delta", w.proj)
                writers.append(p + "mlp.resid_delta")
    return {e for e in edges if e[0][0] in site_widths and e[1][0] in site_widths}
