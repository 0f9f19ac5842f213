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
                  unigram_entropy: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, out_png)
