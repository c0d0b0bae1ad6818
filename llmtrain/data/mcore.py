"""megatron-core's data pipeline without the rest of megatron-core.

`import megatron.core.datasets.x` first runs megatron/core/__init__.py, and that imports the whole
library: tensor and pipeline parallel, transformer layers, the optimizer, fused kernels that call
torch.compile when they are imported (so inductor too). That costs 4-5 s of CPU in every process
that reads data, every rank of every job, more than the rest of a small run's start-up. llmtrain
uses only megatron.core.datasets and the few modules it imports (utils, parallel_state).

`import_datasets()` registers `megatron.core` as a bare package (its real directory, its
__init__ not run), so importing the dataset modules loads only what they import. Should that fail
on some megatron-core release, it removes what it registered and imports megatron.core the usual
way: slower, the same classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# parallel_state first: megatron.core.utils and parallel_state import each other, in this order
# in megatron/core/__init__.py
MODULES = ("megatron.core.parallel_state",
           "megatron.core.datasets.indexed_dataset",
           "megatron.core.datasets.gpt_dataset",
           "megatron.core.datasets.blended_megatron_dataset_builder")


def import_datasets() -> None:
    """Import megatron-core's dataset modules (MODULES) without the rest of megatron-core."""
    if "megatron.core" in sys.modules:
        return
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or spec.submodule_search_locations is None:
        importlib.import_module("megatron.core")  # raises the usual ImportError
        return
    import megatron
    megatron.core = sys.modules["megatron.core"] = importlib.util.module_from_spec(spec)
    try:
        for name in MODULES:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure: forget the bare package, import it whole
        for name in [m for m in sys.modules if m == "megatron.core" or
                     m.startswith("megatron.core.")]:
            del sys.modules[name]
        del megatron.core
        for name in MODULES:
            importlib.import_module(name)
