"""Training logs: one JSON object per logged step in ``metrics.jsonl``, and the loss curve ``loss.png``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step > 0 and self.path.exists():  # drop lines past the checkpoint we resume from
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step == 0:
            self.path.write_text("")

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def read(self) -> List[Dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def plot_loss(records: List[Dict[str, Any]], path: Path, title: str = "training loss") -> None:
    """Loss (and per-level losses) against the step, log scale, to a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if isinstance(r.get("loss"), (int, float))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if rows:
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], label="loss", lw=1.6)
        level_keys = sorted(k for k in rows[0] if k.startswith("loss_level"))
        for k in level_keys:
            ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k.replace("loss_", ""), lw=0.9, alpha=0.8)
        if all(r["loss"] > 0 for r in rows):
            ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
