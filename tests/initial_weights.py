"""`fork_ranks.py N --call tests/initial_weights.py OUT KEY=VALUE...`: each rank builds the model
of the config (the overrides) as `llmtrain train` does (meta device, parallelize, materialise and
initialise its shards) and writes, to OUT/rank<R>.pt, the parameters it holds gathered to their
full shape, and the number of elements of the largest tensor it allocated while building
(test_init.py)."""

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
from llmtrain.parallel.mesh import DistEnv, init_distributed


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


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    env, device = DistEnv.from_environ(), torch.device("cpu")
    cfg = load_config(None, overrides, world_size=env.world_size)
    mesh = init_distributed(cfg, env, device)
    with LargestAllocation() as tracker:
        model = build_model(cfg.model, "meta")
        module = parallelize(model, mesh, cfg, device).module
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    torch.save({"weights": {k: v.detach().clone() for k, v in full.items()},
                "largest_allocation": tracker.largest}, out / f"rank{env.rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
