"""Training: the loop, EMA, atomic checkpoints, logging, sample grids, distributed set-up."""
from mdm_fast.train.checkpoint import CheckpointError, load_checkpoint, load_latest, save_atomic  # noqa: F401
from mdm_fast.train.ema import ModelEma  # noqa: F401
from mdm_fast.train.trainer import Trainer, build_diffusion, build_network  # noqa: F401
