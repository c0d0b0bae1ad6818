"""`llmtrain plan`: per-GPU memory and step-time estimates for parallel layouts.

memory.py (model states, activations), comm.py (alpha-beta per collective), compute.py (FLOPs,
GEMM efficiency, pipeline bubbles), search.py (layout rules, enumeration, ranking), cli.py.
"""

from llmtrain.planner.compute import A100_80GB, H100_SXM, Hardware
from llmtrain.planner.search import Estimate, Layout, best_layout, check_layout, estimate, plan

__all__ = ["A100_80GB", "H100_SXM", "Estimate", "Hardware", "Layout", "best_layout",
           "check_layout", "estimate", "plan"]
