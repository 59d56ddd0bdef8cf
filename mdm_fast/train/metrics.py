"""Training logs: one JSON object per logged step in ``metrics.jsonl``, and the loss curve ``loss.png``."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List

from mdm_fast.files import write_atomic, write_text_atomic

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step > 0 and self.path.exists():  # drop lines past the checkpoint we resume from
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step == 0:
            write_text_atomic(self.path, "")

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def read(self) -> List[Dict[str, Any]]:
        """The logged records; a torn last line (a crash while appending) is dropped with a warning."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for k, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if k < len(lines) - 1:
                    raise ValueError(f"{self.path}: line {k + 1} is not JSON ({e})") from None
                log.warning("%s: dropping its torn last line (a crash while it was written): %r", self.path, line)
        return records


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
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
