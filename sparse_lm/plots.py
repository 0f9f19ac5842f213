"""Training curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def save_png(fig, out_png: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure to `out_png` atomically (an interrupted write never leaves half a PNG) and close it."""
    import io

    import matplotlib.pyplot as plt

    from sparse_lm.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(metrics_path: str | Path, out_png: str | Path, title: str = "",
                  unigram_entropy: float | None = None, gate_nmse: float = 0.3) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    gate_rows = [r for r in rows if "val_kl_no_bridge" in r]  # a bridge run: its gate's numbers at every evaluation
    fig, axes = plt.subplots(1, 4 if gate_rows else 3, figsize=(20 if gate_rows else 15, 4))
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    ax = axes[0]
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    if unigram_entropy:
        ax.axhline(unigram_entropy, color="gray", ls="--", lw=1, label="unigram entropy")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if lr:
        axes[1].plot(*zip(*lr))
    axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    kf = [(r["step"], r["kept_fraction_blocks"]) for r in rows if "kept_fraction_blocks" in r]
    kt = [(r["step"], r["kept_fraction_target"]) for r in rows if "kept_fraction_target" in r]
    if kf:
        axes[2].plot(*zip(*kf), label="measured (block matrices)")
        axes[2].plot(*zip(*kt), "--", label="schedule")
        axes[2].set_yscale("log")
        axes[2].legend()
    else:
        axes[2].text(0.5, 0.5, "dense model", ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set(xlabel="step", ylabel="kept fraction of weights", title="L0")
    if gate_rows:
        _plot_gate(axes[3], gate_rows, gate_nmse)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, out_png)


def _plot_gate(ax, rows: list[dict], nmse_max: float = 0.3) -> None:
    """The bridge quality gate's numbers on validation against step: both hybrid KLs against the no-bridge KL
    (left axis), both NMSEs against the gate's bound (right axis)."""
    steps = [r["step"] for r in rows]
    for key, label, style in (("val_kl_d2s", "KL(dense || d->s)", "o-"), ("val_kl_s2d", "KL(dense || s->d)", "s-"),
                              ("val_kl_no_bridge", "KL(dense || sparse), no bridge", "k--")):
        ax.plot(steps, [r[key] for r in rows], style, label=label)
    ax.set(xlabel="step", ylabel="KL (nats/token)", title="bridge gate (validation)")
    right = ax.twinx()
    for key, style in (("val_nmse_enc", "^:"), ("val_nmse_dec", "v:")):
        right.plot(steps, [r[key] for r in rows], style, color="tab:purple" if key.endswith("enc") else "tab:brown",
                   label=key[4:])
    right.axhline(nmse_max, color="gray", lw=1, ls=":", label=f"NMSE bound {nmse_max:g}")
    right.set_ylabel("NMSE")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
