"""`fork_ranks.py N --call tests/initial_weights.py OUT KEY=VALUE...`: each rank builds the model
of the config (the overrides) as `llmtrain train` does (meta device, parallelize, materialise and
initialise its shards) and writes, to OUT/rank<R>.pt, the parameters it holds gathered to their
full shape, and the number of elements of the largest tensor it allocated while building
(test_init.py). Under parallel.engine=deepspeed the building includes the engine's
initialisation of the parameters (ZeRO-3: `init_partitions`) and the parameters are gathered
from its partitions (test_deepspeed.py)."""

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llmtrain.config import load_config
from llmtrain.model import build_model
from llmtrain.parallel import parallelize
from llmtrain.config.layout import DistEnv
from llmtrain.parallel.mesh import init_distributed


class LargestAllocation(TorchDispatchMode):
    """The most elements of any tensor an op returned on a real device (a DTensor: its local
    tensor), while the mode was active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                t = t.to_local() if isinstance(t, DTensor) else t
                if t.device.type != "meta":
                    self.largest = max(self.largest, t.numel())
        return out


def deepspeed_weights(module, cfg, world_size: int, tracker: LargestAllocation) -> dict:
    """The DeepSpeed engine's initialisation of `module` (ZeRO-3: this rank's partitions,
    allocated and initialised under `tracker`), then its state dict with every parameter
    gathered whole. deepspeed.initialize itself is left out (its flat buffers are meant to be
    large, and it does not change the partitions: test_deepspeed.py's equivalence test runs it)."""
    from deepspeed.runtime.zero import GatheredParameters

    from llmtrain.engines import deepspeed as ds
    if any(p.is_meta for p in module.parameters()):
        with tracker:
            ds.init_partitions(module, ds.build_config(cfg, world_size)[0], cfg.train.seed)
    with GatheredParameters(list(module.parameters())):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    env, device = DistEnv.from_environ(), torch.device("cpu")
    cfg = load_config(None, overrides, world_size=env.world_size)
    mesh = init_distributed(cfg, env, device)
    with LargestAllocation() as tracker:
        model = build_model(cfg.model, "meta")
        module = parallelize(model, mesh, cfg, device).module
    if cfg.parallel.engine == "deepspeed":
        full = deepspeed_weights(module, cfg, env.world_size, tracker)
    else:
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    torch.save({"weights": {k: v.detach().clone() for k, v in full.items()},
                "largest_allocation": tracker.largest}, out / f"rank{env.rank}.pt")
    if torch.distributed.is_initialized():
        # rank 0 hosts the store: it must not exit while a rank still builds its groups (a pp2
        # rank 0 has no collective with stage 1 after the mesh and could finish first)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
