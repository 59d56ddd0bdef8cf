"""``mdm-fast demo``: a small class-conditioned nested model on scikit-learn's 8x8 digits.

The inner level is the 8x8 digit itself, the outer level 32x32; on a 2-core CPU with no GPU it
trains for a few minutes and samples a grid (one row per digit, every resolution of each sample side
by side). With a GPU it trains a wider model for more steps in about the same time.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

import torch
import yaml

from mdm_fast.config import ExperimentConfig, load_experiment

DEMO_NAME = "demo_digits"


def demo_config(out: Path, gpu: bool, steps: int, quick: bool) -> ExperimentConfig:
    width = 2 if gpu else 1
    inner = {
        "resolution_channels": [64 * width, 128 * width], "num_resnets_per_resolution": [2, 2],
        "attention_levels": [1], "num_attention_layers": [0, 1], "conditioning_feature_proj_dim": -1,
        "masked_cross_attention": 0, "nesting": True, "skip_mid_blocks": False, "skip_cond_emb": False,
        "temporal_dim": 256 * width, "resnet_config": {"num_groups_norm": 16, "dropout": 0.0},
    }
    outer = {
        "resolution_channels": [32 * width, 32 * width, 64 * width], "num_resnets_per_resolution": [1, 1, 1],
        "attention_levels": [], "num_attention_layers": [0, 0, 0], "conditioning_feature_proj_dim": -1,
        "masked_cross_attention": 0, "skip_mid_blocks": True, "skip_cond_emb": True, "skip_normalization": True,
        "temporal_dim": 256 * width, "resnet_config": {"num_groups_norm": 16, "dropout": 0.0},
        "inner_config": inner,
    }
    if quick:  # a smoke test: tiny widths
        inner.update(resolution_channels=[16, 32], temporal_dim=64, num_resnets_per_resolution=[1, 1],
                     resnet_config={"num_groups_norm": 8, "dropout": 0.0})
        outer.update(resolution_channels=[8, 8, 16], temporal_dim=64,
                     resnet_config={"num_groups_norm": 8, "dropout": 0.0})
    d: Dict[str, Any] = {
        "name": DEMO_NAME, "model": "nested_unet", "unet_config": outer,
        "diffusion_config": {
            "sampler_config": {"num_diffusion_steps": 1000, "schedule_type": "DEEPFLOYD",
                               "prediction_type": "V_PREDICTION", "loss_target_type": "V_PREDICTION",
                               "schedule_shifted": True},
            "use_vdm_loss_weights": False, "use_double_loss": True, "no_use_residual": True,
            "mixed_ratio": "1:1",  # the 32px level trains on half of each batch: more steps per minute
        },
        "reader_config": {"image_size": 32, "num_readers": 0},
        "file_list": "sklearn:digits", "categorical_conditioning": 10, "cond_drop_prob": 0.1,
        "output_dir": str(out), "batch_size": 64 if gpu else 32, "lr": 2e-3 if not quick else 1e-3,
        "warmup_steps": 20 if quick else 100, "gradient_clip_norm": 1.0, "num_training_steps": steps,
        "log_freq": 1 if quick else 10, "save_freq": max(1, steps // 4), "ema_decay": 0.99,
        "ema_warmup_steps": 0 if quick else 100, "seed": 0, "fp16": 1 if gpu else 0,
    }
    return load_experiment(d)


def _is_demo_run(out: Path) -> bool:
    """Whether ``out`` was written by a demo (its config.yaml names the demo's run)."""
    try:
        return yaml.safe_load((out / "config.yaml").read_text()).get("name") == DEMO_NAME
    except (OSError, AttributeError, yaml.YAMLError):
        return False


def run_demo(out: Path, steps: int = 0, minutes: float = 0, quick: bool = False, resume: bool = False
             ) -> Dict[str, Any]:
    from mdm_fast.train import Trainer
    from mdm_fast.train.checkpoint import list_checkpoints
    from mdm_fast.train.grids import generate, save_grid

    t0 = time.time()
    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = steps or (12 if quick else (3000 if gpu else 800))
    minutes = minutes or (1.0 if quick else 5.5)  # leaves room for start-up and sampling in 10 minutes
    out = Path(out)
    if not resume:
        found = list_checkpoints(out)
        if found and not _is_demo_run(out):
            raise ValueError(f"demo: {out} holds checkpoints of another run ({found[0][1].name}, ...); a fresh "
                             "demo would delete them: pick another --out, or --resume a demo run")
        for _, path in found:
            path.unlink()
    cfg = demo_config(out, gpu, steps, quick)
    trainer = Trainer(cfg)
    result = trainer.train(deadline=t0 + 60 * minutes)
    trained = time.time() - t0
    rows = list(range(10))
    levels = generate(trainer.diffusion, trainer.ema.module, trainer.encoder, [str(r) for r in rows],
                      4 if quick else 8, cfg.image_size, trainer.device, steps=10 if quick else 40,
                      guidance=3.0, seed=0, progress=True)
    save_grid(levels, out / "samples.png", rows=len(rows), row_labels=[f"digit {r}" for r in rows],
              scale=1 if quick else 2)
    return {"out": str(out), "steps": result["step"], "train_seconds": round(trained, 1),
            "total_seconds": round(time.time() - t0, 1), "samples": str(out / "samples.png"),
            "loss_curve": str(out / "loss.png"), "metrics": str(out / "metrics.jsonl")}
