"""Pipeline layout arithmetic: which decoder layers each pipeline stage holds, which stages each
pp rank runs. Pure functions of the config, shared by the validator (config.py), the pipeline
split (parallel/pipeline.py) and the planner (planner/search.py).

Its own module so that config.py can use it: it imports neither torch.distributed nor
llmtrain.parallel (whose __init__ imports config.py), and reads `Config` for type hints only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py imports this module
    from llmtrain.config import Config


def balanced_layer_counts(n_layers: int, n_chunks: int) -> list[int]:
    """`n_layers` split into `n_chunks` consecutive ranges, the first n_layers % n_chunks taking
    one more layer."""
    return [n_layers // n_chunks + (1 if i < n_layers % n_chunks else 0) for i in range(n_chunks)]


def stage_layer_counts(cfg: Config) -> list[int]:
    """Layers per stage, `pp * virtual_stages` entries: `parallel.pp_layers` or balanced (the
    first n_layers % stages stages take one more)."""
    p = cfg.parallel
    if p.pp_layers:
        return list(p.pp_layers)
    return balanced_layer_counts(cfg.model.n_layers, p.pp * p.virtual_stages)


def stage_layer_ids(cfg: Config) -> list[list[int]]:
    """The layer indices of each stage (consecutive ranges, in stage order)."""
    counts = stage_layer_counts(cfg)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [list(range(s, s + c)) for s, c in zip(starts, counts)]


def rank_stages(cfg: Config, pp_rank: int) -> list[int]:
    """Stage indices pp rank `pp_rank` runs (looped placement)."""
    return [pp_rank + v * cfg.parallel.pp for v in range(cfg.parallel.virtual_stages)]
