"""Execution engines around the model: CUDA-graph runners for sampling and training, and the parallel
Triton pre-compilation of a step's kernels."""
from mdm_fast.engine.graphs import (GraphedCallable, GraphedTrainStep, graphed_sampler_step,  # noqa: F401
                                   side_stream)
from mdm_fast.engine.precompile import PrecompileStats, precompile, precompile_training  # noqa: F401
