"""The parallel layout of a run, resolved once: `ParallelDims.from_config(cfg, world_size)`.

A config names degrees of parallelism, one of which (`parallel.dp_shard=-1`) means "the ranks the
others leave"; from the world size follow the data-parallel size, the micro-batches every rank
runs per step and which decoder layers each pipeline stage holds. The validator (validate.py),
the mesh (parallel/mesh.py) and the planner (planner/search.py) read `ParallelDims` instead of
redoing that arithmetic; the pipeline split (parallel/pipeline.py) and the data loader, which know
no world size, call the functions below that it is built from.

Pure arithmetic on the config: it imports neither torch.distributed nor llmtrain.parallel, so
that the config package can use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmtrain.config.errors import ConfigError
from llmtrain.config.schema import Config


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


def pipeline_split_problem(cfg: Config) -> str | None:
    """Why the decoder cannot be cut into `pp x virtual_stages` stages as the config asks (a
    message naming the keys), or None."""
    m, p = cfg.model, cfg.parallel
    stages = p.pp * p.virtual_stages
    if stages > m.n_layers:
        return (f"parallel.pp={p.pp} x parallel.virtual_stages={p.virtual_stages} = {stages} "
                f"stages exceeds model.n_layers={m.n_layers}; every stage needs at least one "
                f"layer")
    if p.pp_layers is not None and (len(p.pp_layers) != stages or sum(p.pp_layers) != m.n_layers
                                    or min(p.pp_layers) < 1):
        return (f"parallel.pp_layers={p.pp_layers} must hold pp x virtual_stages = {stages} "
                f"counts of at least 1 that sum to model.n_layers={m.n_layers}")
    return None


def micro_batches(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches each of `dp` data-parallel ranks runs per step (gradient accumulation):
    global_batch_size / (micro_batch_size * dp), sizes in sequences."""
    return global_batch_size // (micro_batch_size * dp)


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of parallelism of a run on `world_size` ranks, the mesh `pp x dp_replicate x
    dp_shard x cp x tp` (outermost first) with the ep expert groups inside dp_shard. cp ranks
    hold different tokens of the same sequences, so they are not data-parallel ranks."""

    world_size: int
    pp: int
    dp_replicate: int
    dp_shard: int  # parallel.dp_shard, -1 resolved to the ranks the other degrees leave
    tp: int
    ep: int
    cp: int
    # per data-parallel rank and step, at least 1 (exact where validate() passed: it checks
    # that micro_batch_size x dp divides the global batch)
    micro_batches: int
    pp_microbatches: int  # the pipeline schedule's: parallel.pp_microbatches, 0 = micro_batches
    # decoder layers of each pipeline stage, in stage order; empty where they cannot be split so
    # (pipeline_split_problem: validate() refuses that with pp > 1)
    stage_layers: tuple[tuple[int, ...], ...]
    pp_rank_stages: tuple[tuple[int, ...], ...]  # stages of pp rank r: r, r + pp, ... (looped)

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the ranks that each read their own share of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def fits(self) -> bool:
        """The degrees multiply to the world size (always true unless built with strict=False)."""
        return self.pp * self.dp * self.cp * self.tp == self.world_size

    @classmethod
    def from_config(cls, cfg: Config, world_size: int, *, strict: bool = True) -> ParallelDims:
        """The layout `cfg` asks for on `world_size` ranks; a ConfigError where its degrees do
        not multiply to the world size. `strict=False` resolves without that check (dp_shard=-1
        taking at least 1 rank) for callers that report it their own way: the planner lists every
        rule a layout breaks, `fit_micro_batch` runs before validate()."""
        p, t = cfg.parallel, cfg.train
        other = p.pp * p.dp_replicate * p.cp * p.tp
        dp_shard = p.dp_shard if p.dp_shard > 0 else max(world_size // other, 1)
        n_micro = max(micro_batches(t.global_batch_size, t.micro_batch_size,
                                    p.dp_replicate * dp_shard), 1)
        layers, ranks = _pipeline_split(cfg)
        dims = cls(world_size=world_size, pp=p.pp, dp_replicate=p.dp_replicate,
                   dp_shard=dp_shard, tp=p.tp, ep=p.ep, cp=p.cp, micro_batches=n_micro,
                   pp_microbatches=p.pp_microbatches or n_micro, stage_layers=layers,
                   pp_rank_stages=ranks)
        if strict and not dims.fits:
            given = other * (p.dp_shard if p.dp_shard > 0 else 1)
            raise ConfigError(
                f"parallel layout pp={p.pp} x dp_replicate={p.dp_replicate} x dp_shard="
                f"{p.dp_shard} x cp={p.cp} x tp={p.tp} = {given} does not match the world size {world_size}")
        return dims


def _pipeline_split(cfg: Config) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """(layers of each stage, stages of each pp rank); without a pipeline one stage holds all
    (virtual_stages and pp_layers are not read at pp=1)."""
    p = cfg.parallel
    if p.pp == 1:
        return (tuple(range(cfg.model.n_layers)),), ((0,),)
    if pipeline_split_problem(cfg):  # first: unchecked, pp x virtual_stages may be 2**32 stages
        return (), ()
    return (tuple(map(tuple, stage_layer_ids(cfg))),
            tuple(tuple(rank_stages(cfg, r)) for r in range(p.pp)))


@dataclass(frozen=True)
class DistEnv:
    """Who this process is, from the launcher's environment: torchrun and the deepspeed launcher
    set RANK / WORLD_SIZE / LOCAL_RANK; under Slurm without them, SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID. Here, free of torch, so that `llmtrain train` checks its config before
    importing torch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> "DistEnv":
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            # srun without torchrun: the rendezvous is the first node of the job
            env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
            env.setdefault("MASTER_PORT", "29500")
            return cls(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)))
        return cls()
