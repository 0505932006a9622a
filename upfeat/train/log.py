"""Training metrics as CSV (one row per logged step) and a PNG loss curve."""
from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ["step", "loss", "nll", "crf", "tv", "kernel", "feat", "recon", "lr", "sec_per_step", "data_wait_s",
           "elapsed_s"]


class CsvLog:
    """Append-only ``metrics.csv``; on resume, rows after the resumed step are dropped first
    (a killed run may have logged steps that its last checkpoint does not contain)."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        rows = self.read(self.path) if (resume_step is not None and self.path.is_file()) else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows({k: _fmt(r.get(k)) for k in COLUMNS} for r in rows)

    def append(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: _fmt(row.get(k)) for k in COLUMNS})

    @staticmethod
    def read(path: str | Path) -> list[dict[str, float]]:
        with open(path, newline="") as f:
            return [{k: (int(v) if k == "step" else float(v)) for k, v in r.items() if v != ""}
                    for r in csv.DictReader(f)]


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def plot_curve(csv_path: str | Path, png_path: str | Path, smooth: int = 25) -> Path:
    """Loss and NLL against step, raw (faint) and as a running mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = CsvLog.read(csv_path)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if rows:
        steps = np.array([r["step"] for r in rows])
        second = "nll" if "nll" in rows[0] else "feat"  # multi-view / scale objective
        for key, color in (("loss", "C0"), (second, "C1")):
            y = np.array([r.get(key, np.nan) for r in rows])
            ax.plot(steps, y, color=color, alpha=0.25, lw=0.8)
            k = max(1, min(smooth, len(y) // 4))
            ax.plot(steps[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color=color,
                    lw=1.6, label=f"{key} (mean of {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
