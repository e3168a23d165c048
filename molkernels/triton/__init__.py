"""Triton kernels for the core ops, one module per op: gram.py (gram, cross_gram), combine.py
(combine, combine_into and MoCo's second pass, one launch for all blocks), simplex.py
(project_simplex), min_norm.py, moco.py (MoCo's first pass and joint Gram), and federated.py (the
client-stacked optimiser steps of molkernels.federated). They take the already checked arguments of
molkernels.ops and run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""

from .combine import combine, combine_into, moco_track_combine
from .federated import fl_adam_step, fl_sgd_step, fl_weighted_mean
from .gram import cross_gram, gram
from .min_norm import min_norm
from .moco import joint_gram, moco_track_gram
from .simplex import project_simplex

__all__ = ["gram", "cross_gram", "combine", "project_simplex", "min_norm", "combine_into", "moco_track_gram",
           "joint_gram", "moco_track_combine", "fl_adam_step", "fl_sgd_step", "fl_weighted_mean"]
