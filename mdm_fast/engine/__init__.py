"""Execution engines around the model: CUDA-graph runners for sampling and training."""
from mdm_fast.engine.graphs import GraphedCallable, GraphedTrainStep, graphed_sampler_step  # noqa: F401
