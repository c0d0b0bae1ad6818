"""Initial weights that do not depend on the layout.

A model's `init_weights()` says how each parameter starts (normal with this std, xavier, ones,
zeros, ...). Run plainly, it would draw from torch's global generator in call order, so the
weights would depend on how the model is split: a rank holding a quarter of a matrix cannot draw
"its" quarter of the single-process draw without drawing the whole matrix first. Under
`layout_free_init`, every element of parameter FQN is instead a fixed function of
(train.seed, FQN, the element's index in the full tensor):

* a counter-based generator (numpy's Philox, keyed by a hash of seed and FQN) gives the 64-bit
  word w_k of every index k of the parameter's flat (row-major) full tensor without drawing the
  ones before it: the counter is set to k / 4 (Philox gives four words per counter value);
* uniform(a, b) takes 53 bits of w_k; normal(mean, std) takes Box-Muller on w_k's two 32-bit
  halves, computed on the host (numpy) and copied into the parameter's shard.

So any rank can fill any box of a tensor (its shard) and get exactly the values that box has in
the single-process model, whatever the ZeRO stage, tensor/expert/pipeline degree or world size,
and never holds more than its shard plus a bounded chunk (`CHUNK`). The box of each parameter
comes from `local_box`: the whole tensor here; parallel/init.py passes one for DTensor shards
(this package knows nothing of ranks).

The `init_weights()` code stays as it is: a TorchFunctionMode catches the torch.nn.init and
in-place Tensor calls it makes on parameters (normal_, uniform_, xavier_*, zeros_, ones_,
constant_, fill_, zero_) and fills the box instead. Any other in-place call on a parameter during
init is an error, so a new initialiser cannot silently make the weights layout-dependent again.
Buffers (rope tables, router statistics) are computed as usual.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# elements generated at a time: bounds the scratch (a few float64 temporaries per element)
CHUNK = 1 << 20

# (the tensor to write, the full tensor's shape, the box's offset in it): `local` has the box's
# shape
LocalBox = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]]


def whole_tensor(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """The box of an unsharded parameter: all of it."""
    return param.data, tuple(param.shape), (0,) * param.dim()


def stream_key(seed: int, fqn: str) -> np.ndarray:
    """The Philox key of one parameter: 128 bits of blake2b(seed, FQN)."""
    digest = hashlib.blake2b(f"{seed}:{fqn}".encode(), digest_size=16).digest()
    return np.frombuffer(digest, dtype=np.uint64).copy()


def draws(key: np.ndarray, start: int, count: int) -> np.ndarray:
    """The 64-bit words start .. start+count-1 of the stream `key`."""
    raw = np.random.Philox(key=key, counter=start // 4).random_raw(start % 4 + count)
    return raw[start % 4:]


def uniforms(key: np.ndarray, start: int, count: int) -> np.ndarray:
    """u_start .. u_(start+count-1), uniform in [0, 1) (float64): 53 bits of each word."""
    return (draws(key, start, count) >> np.uint64(11)) * 2.0 ** -53


def normals(key: np.ndarray, start: int, count: int) -> np.ndarray:
    """Standard normals z_start .. z_(start+count-1) (float64), one word each: Box-Muller on
    its two 32-bit halves, z = sqrt(-2 ln u1) cos(2 pi u2), u1 in (0, 1), u2 in [0, 1). (The
    sine value of the pair is not used, so each index needs only its own word.)"""
    halves = draws(key, start, count).view(np.uint32).reshape(-1, 2).astype(np.float64)
    lo, hi = (halves[:, 0], halves[:, 1]) if np.little_endian else (halves[:, 1], halves[:, 0])
    u1, u2 = (hi + 0.5) * 2.0 ** -32, lo * 2.0 ** -32
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _last_cut(shape: tuple[int, ...], box: tuple[int, ...]) -> int:
    """The last dimension the box does not span whole (-1: it is the whole tensor)."""
    return max((d for d in range(len(shape)) if box[d] != shape[d]), default=-1)


def flat_runs(shape: tuple[int, ...], offset: tuple[int, ...],
              box: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """The box as runs of consecutive flat indices of the full tensor, in row-major order of the
    box: (first flat index, length). Dimensions after the last one the box cuts are whole, so
    each run spans them; one run per index of the dimensions before it."""
    cut = _last_cut(shape, box)
    if cut < 0:
        yield 0, math.prod(shape)
        return
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    first = sum(offset[d] * strides[d] for d in range(cut, len(shape)))
    for idx in np.ndindex(*box[:cut]):
        yield first + sum((offset[d] + i) * strides[d] for d, i in enumerate(idx)), \
            math.prod(box[cut:])


def fill_box(local: torch.Tensor, shape: tuple[int, ...], offset: tuple[int, ...], key,
             draw: Callable[[np.ndarray, int, int], np.ndarray]) -> None:
    """Write draw(key, flat index, count) of the full tensor `shape` into `local`, the box at
    `offset`, CHUNK elements at a time (computed on the host in float64, sent to local's device
    as float32 unless the parameter is float64)."""
    if local.numel() == 0:
        return
    host = np.float64 if local.dtype == torch.float64 else np.float32
    runs = list(flat_runs(shape, offset, tuple(local.shape)))
    rows = local.view(len(runs), -1)  # one row per run
    for i, (start, n) in enumerate(runs):
        for c in range(0, n, CHUNK):
            m = min(CHUNK, n - c)
            rows[i, c:c + m].copy_(torch.from_numpy(draw(key, start + c, m).astype(host)))


class _LayoutFreeInit(TorchFunctionMode):
    """Routes init calls on the parameters in `names` to fill_box (module docstring)."""

    def __init__(self, names: dict[int, str], seed: int, local_box: LocalBox):
        super().__init__()
        self.names, self.seed, self.local_box = names, seed, local_box

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # torch.nn.init functions hand every argument over by keyword
        target = args[0] if args else kwargs.get("tensor")
        name = self.names.get(id(target)) if isinstance(target, torch.Tensor) else None
        if name is None:
            return func(*args, **kwargs)
        fill = _fill_of(getattr(func, "__name__", ""), args[1:], kwargs)
        if fill is None:
            op = getattr(func, "__name__", "")
            if op.endswith("_") and not op.endswith("__"):  # in place (not a dunder)
                raise RuntimeError(f"init of {name} calls {func.__name__}, which the "
                                   f"layout-independent init does not reproduce (model/init.py)")
            return func(*args, **kwargs)
        local, shape, offset = self.local_box(target)
        with torch.no_grad():
            fill(local, shape, offset, stream_key(self.seed, name))
        return target


def _args(args: tuple, kwargs: dict, names: tuple[tuple[str, ...], ...], defaults: tuple):
    """The call's values of the parameters `names` (each with its aliases), positional first."""
    out = []
    for i, (aliases, default) in enumerate(zip(names, defaults)):
        given = [kwargs[a] for a in aliases if a in kwargs]
        out.append(args[i] if i < len(args) else given[0] if given else default)
    return out


def _fill_of(op: str, args: tuple, kwargs: dict):
    """fill(local, shape, offset, key) for an init call (torch.nn.init.X or Tensor.X; `args`
    after the tensor), or None if `op` is not one."""
    if op == "normal_":
        mean, std = _args(args, kwargs, (("mean",), ("std",)), (0.0, 1.0))
        return lambda local, shape, offset, key: fill_box(
            local, shape, offset, key, lambda k, s, n: mean + std * normals(k, s, n))
    if op == "uniform_":
        a, b = _args(args, kwargs, (("a", "from"), ("b", "to")), (0.0, 1.0))
        return lambda local, shape, offset, key: fill_box(
            local, shape, offset, key, lambda k, s, n: a + (b - a) * uniforms(k, s, n))
    if op in ("constant_", "fill_"):
        value = _args(args, kwargs, (("val", "value"),), (None,))[0]
    else:
        value = {"zeros_": 0.0, "zero_": 0.0, "ones_": 1.0}.get(op)
    if value is None:
        return None
    return lambda local, shape, offset, key: local.fill_(value)


def layout_free_init(model: nn.Module, seed: int, local_box: LocalBox = whole_tensor,
                     names: dict[int, str] | None = None) -> float:
    """Run `model.init_weights()` with every parameter drawn from (seed, FQN, index) (module
    docstring); `names` maps id(parameter) to its FQN in the whole model (default: model's own
    FQNs). Returns the seconds it took."""
    start = time.perf_counter()
    if names is None:
        names = {id(p): fqn for fqn, p in model.named_parameters()}
    with _LayoutFreeInit(names, seed, local_box):
        model.init_weights()
    return time.perf_counter() - start
