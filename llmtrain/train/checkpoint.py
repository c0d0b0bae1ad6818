"""Checkpoints in `torch.distributed.checkpoint` (DCP) format, verified and published atomically.

Layout of `<dir>/step_<N>/`: DCP's `.metadata` and `__<rank>_0.distcp` shards (model and optimizer,
resharded on load by DCP), `rng_rank<R>.pt` (tensors only, loaded with `weights_only=True`),
`meta.json` (step, tokens, config hash, layout, versions) and, written last, `manifest.json` (size
and sha256 of every other file). Every rank writes into `.step_<N>.tmp/`; rank 0 renames it to
`step_<N>/` after all ranks finished, so a directory named `step_<N>` was complete when written,
and the manifest tells whether it still is (truncated copies, flipped bits). `resume: auto` takes
the newest checkpoint that verifies. The data position is the step (see data/loader.py).
With `checkpoint.async: true` the same files are written in the background (`AsyncSaver`).

A model-only checkpoint (`"model_only": true` in meta.json, written by `llmtrain import-hf`) holds
the model and no optimizer or RNG state; loading it leaves the optimizer as built (fresh).

Unpickling: DCP's stock FileSystemReader reads `.metadata` with a bare `pickle.load` and its
DefaultLoadPlanner reads non-tensor entries (optimizer hyperparameters) with
`torch.load(weights_only=False)`; only tensors go through `weights_only=True`. A checkpoint is
data a user may have downloaded, so `load` replaces both: `.metadata` is read by an unpickler that
admits only DCP's own metadata classes, and byte entries by `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (DefaultLoadPlanner, DefaultSavePlanner,
                                          FileSystemReader, FileSystemWriter)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from llmtrain.config import Config, ConfigError, RopeScalingConfig
from llmtrain.parallel import get_train_state, set_train_state

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
# Model settings that change neither the parameter shapes nor what they compute at inference.
_NOT_ARCH = ("dropout", "init_std")


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (a no-op without torch.distributed)."""
    if dist.is_initialized():
        dist.barrier()


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(cfg: Config) -> str:
    """Hash of what makes two runs the same model and data (not steps, logging or checkpointing)."""
    return _hash(run_identity(cfg))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys added to the model/data sections after checkpoints were first written: at their default
# they leave the identity (and so the hash) of a run as it was, so those checkpoints still resume.
_ADDED_KEYS = {("data", "skip_bad_lines"): False, ("model", "parametrization"): "standard",
               ("model", "base_d_model"): None,
               ("model", "rope_scaling"): dataclasses.asdict(RopeScalingConfig()),
               ("model", "attention_window"): 0, ("model", "attention_global_every"): 0,
               ("model", "qk_norm"): False, ("model", "value_residual"): False,
               ("model", "logit_softcap"): 0.0}


def run_identity(cfg: Config) -> dict:
    """The model and data sections: what `config_hash` hashes (kept in meta.json so that a
    refusal can name the keys that differ)."""
    d = cfg.to_dict()
    ident = {k: d[k] for k in ("model", "data")}
    for (section, key), default in _ADDED_KEYS.items():
        if ident[section].get(key) == default:
            del ident[section][key]
    return ident


def config_diff(old: dict, new: dict, limit: int = 4) -> str:
    """`model.d_model: 64 -> 32, ...`: the keys of two `run_identity` dicts that differ."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "(unset)") != b.get(k, "(unset)"))
    shown = [f"{k}: {str(a.get(k, '(unset)'))[:40]} -> {str(b.get(k, '(unset)'))[:40]}"
             for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_same_run(meta: dict, cfg: Config, path: Path) -> None:
    """Refuse checkpoint `path` if its run had other model or data settings, naming them."""
    if meta.get("config_hash") == config_hash(cfg):
        return
    saved = meta.get("config")
    what = (config_diff(saved, run_identity(cfg)) if isinstance(saved, dict)
            else f"config hash {meta.get('config_hash')} != {config_hash(cfg)}")
    raise ConfigError(f"checkpoint {path} was written by a run with different model or data "
                      f"settings ({what}); use checkpoint.resume=none to start afresh")


_UNSET = object()


def arch_hash(cfg: Config) -> str:
    """Hash of the model architecture alone: what a model-only checkpoint must match."""
    m = {k: v for k, v in cfg.to_dict()["model"].items() if k not in _NOT_ARCH
         and _ADDED_KEYS.get(("model", k), _UNSET) != v}  # an added key at its default: as before
    m.update(d_ff=cfg.model.ffn_dim, n_kv_heads=cfg.model.kv_heads)  # defaults resolved
    return _hash(m)


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


_MAX_JSON_BYTES = 64 << 20  # meta.json is ~1 KiB; a manifest lists a few files per rank


def read_json_object(path: Path) -> dict:
    """The JSON object in checkpoint file `path` (bounded read); a one-line ConfigError if it is
    unreadable, too large or not an object."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_JSON_BYTES + 1)
        data = json.loads(raw) if len(raw) <= _MAX_JSON_BYTES else None
    except (OSError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint file {path} is corrupted (not a JSON object of at most "
                          f"{_MAX_JSON_BYTES >> 20} MiB)")
    return data


def is_diverged(path: Path) -> bool:
    """Whether checkpoint `path` was written after a non-finite (skipped) step: its weights are
    suspect, so `resume: auto` passes over it and pruning never removes a good one for it."""
    try:
        return bool(read_json_object(Path(path) / "meta.json").get("diverged"))
    except ConfigError:
        return False  # unreadable: verify() reports it


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under `root`, oldest first (`.step_<N>.tmp` saves in flight or
    interrupted are not listed)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------------------------
# Integrity: a manifest of every file, checked before anything is read


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    """Record size and sha256 of every file under `path` in `path/manifest.json` (call last)."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[f.relative_to(path).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


_VERIFIED: set[Path] = set()  # checkpoints verified by this process (find_resume, then load)


def verify(path: Path) -> None:
    """Raise a one-line ConfigError naming the first file of checkpoint `path` that is missing,
    truncated or corrupted. A checkpoint without a manifest (written before manifests existed)
    passes with a warning."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"checkpoint {path} is incomplete: {path / 'meta.json'} is missing")
    mf = path / MANIFEST
    if not mf.is_file():
        warnings.warn(f"checkpoint {path} has no {MANIFEST}; its files cannot be verified")
        return
    files = read_json_object(mf).get("files")
    if not isinstance(files, dict) or not all(
            isinstance(w, dict) and isinstance(w.get("size"), int)
            and isinstance(w.get("sha256"), str) for w in files.values()):
        raise ConfigError(f"checkpoint file {mf} is corrupted (not a valid manifest)")
    for rel, want in files.items():
        f = path / rel
        # a crafted manifest must not make us read (hash) files outside the checkpoint
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConfigError(f"checkpoint file {mf} is corrupted: it lists {rel[:60]!r}, "
                              f"outside the checkpoint")
        if not f.is_file():
            raise ConfigError(f"checkpoint file {f} is missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != want["size"]:
            raise ConfigError(f"checkpoint file {f} is truncated or overwritten: {size} bytes, "
                              f"{MANIFEST} says {want['size']}")
        if _sha256(f) != want["sha256"]:
            raise ConfigError(f"checkpoint file {f} is corrupted: its sha256 differs from "
                              f"{MANIFEST}")
    _VERIFIED.add(path.resolve())


def latest_good(root: Path, log=None) -> Path | None:
    """The newest checkpoint under `root` that verifies and was not written after a diverged
    step; each damaged newer one is reported by `log` (default: a warning on stderr). Raises
    when checkpoints exist but none is good."""
    log = log or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    found = list_checkpoints(root)
    errors, diverged = [], []
    for path in reversed(found):
        if is_diverged(path):
            diverged.append(path)
            continue
        try:
            verify(path)
        except ConfigError as e:
            errors.append(str(e))
            log(f"skipping damaged checkpoint {path}: {e}")
            continue
        if diverged:
            log(f"skipping {len(diverged)} checkpoint(s) written after non-finite steps "
                f"(newest {diverged[0].name}); using {path.name}")
        return path
    if diverged and not errors:
        raise ConfigError(f"every checkpoint under {root} was written after non-finite steps "
                          f"(newest {diverged[0].name}); resume one anyway with "
                          f"checkpoint.resume=PATH, or start afresh with checkpoint.resume=none")
    if found:
        raise ConfigError(f"no intact checkpoint under {root} (newest: {errors[0]}); use "
                          f"checkpoint.resume=none to start afresh")
    return None


# ----------------------------------------------------------------------------------------------
# Loading without unpickling arbitrary objects


# Exactly the globals DCP writes into `.metadata` (found by recording find_class while loading real
# checkpoints): anything else, a dotted attribute path, or a module is refused.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided etc.
    ("torch", "Size"),
    ("collections", "OrderedDict"),
} | {("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath",
                                     "PureWindowsPath")}


class _MetadataUnpickler(pickle._Unpickler):
    """Reads DCP's `.metadata` admitting only `_METADATA_GLOBALS` and torch dtypes.

    The pure-Python unpickler, because its opcode table can be narrowed: BUILD (which sets
    attributes) is allowed on instances of the admitted classes only, never on a class, module or
    function, so a file cannot monkeypatch what it was allowed to name."""

    dispatch = dict(pickle._Unpickler.dispatch)
    _classes = None  # the admitted classes, resolved on the first BUILD

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and "." not in name \
                and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module[:60]}.{name[:60]} is not allowed in DCP "
                                     f"metadata")

    def load_build(self):
        target = self.stack[-2]  # BUILD pops the state above its target
        if self._classes is None:
            self._classes = {super(_MetadataUnpickler, self).find_class(m, n)
                             for m, n in _METADATA_GLOBALS}
        if type(target) not in self._classes:
            raise pickle.UnpicklingError(f"setting attributes of a {type(target).__name__} is "
                                         f"not allowed in DCP metadata")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _check_storage(metadata, path: Path) -> None:
    """Every storage record must point into a shard file of this checkpoint, within its size
    (a crafted record could otherwise read any file the process can open)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata
    if not isinstance(metadata, Metadata):
        raise ConfigError(f"checkpoint file {path} is not valid DCP metadata: it holds a "
                          f"{type(metadata).__name__}")
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(rel, str) \
                or rel != os.path.basename(rel) or rel in ("", ".", ".."):
            raise ConfigError(f"checkpoint file {path} is not valid DCP metadata: a storage "
                              f"record names {str(rel)[:60]!r}, not a shard file of the "
                              f"checkpoint")
        if rel not in sizes:
            shard = path.parent / rel
            sizes[rel] = shard.stat().st_size if shard.is_file() else -1
        if not (isinstance(info.offset, int) and isinstance(info.length, int)
                and 0 <= info.offset and 0 <= info.length
                and info.offset + info.length <= sizes[rel]):
            raise ConfigError(f"checkpoint file {path} is not valid DCP metadata: its record "
                              f"for {rel} lies outside that file")


def _read_metadata(path: Path):
    """Unpickle DCP's `.metadata` with _MetadataUnpickler; a ConfigError naming it if refused."""
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError,
                KeyError, IndexError, RuntimeError, RecursionError) as e:
            raise ConfigError(f"checkpoint file {path} is not valid DCP metadata: "
                              f"{str(e)[:200]}") from None
    _check_storage(metadata, path)
    return metadata


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        metadata = _read_metadata(Path(self.path) / (".metadata" if rank is None
                                                     else f"__{rank}.metadata"))
        # what FileSystemReader.read_metadata adds after unpickling
        from torch.distributed.checkpoint.metadata import StorageMeta
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, but non-tensor entries are read with `weights_only=True` (the same
    body as torch's `load_bytes`, which uses weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _dcp_load(state: dict, path: Path) -> None:
    _read_metadata(path / ".metadata")  # refuse here: dcp.load would wrap the error in its own
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process
        dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner())


def _dcp_save(state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process
        dcp.save(state, checkpoint_id=str(path))


class _StreamingWriter(FileSystemWriter):
    """FileSystemWriter (one file, tensors in plan order, each by DCP's own `_write_item`, then
    fsync) that drops each tensor once written: DCP's loop keeps every written tensor referenced
    until the file is closed, so a state dict produced on the fly would end up all in memory."""

    def write_data(self, plan, planner):
        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
        from torch.distributed.checkpoint.planner import WriteItemType
        from torch.futures import Future
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        # byte entries first, as DCP writes them
        items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            for item in items:
                results.append(_write_item(self.transforms, stream, planner.resolve_data(item),
                                           item, name, self.serialization_format))
            if self.sync_files:
                os.fsync(stream.fileno())
        done = Future()
        done.set_result(results)
        return done


class _LoadingPlanner(DefaultSavePlanner):
    """Plans from a state dict of meta tensors; each tensor's data is `load(name)` when written
    (`name`: the key in the state dict under "model")."""

    def __init__(self, load: Callable[[str], torch.Tensor]):
        super().__init__()
        self.load = load
        self.load_error: Exception | None = None

    def resolve_data(self, write_item):
        from torch.distributed.checkpoint.planner import WriteItemType
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        try:
            tensor = self.load(write_item.index.fqn.removeprefix("model.")).detach().cpu()
        except Exception as e:
            self.load_error = e
            raise
        # what DCP's loader does: a view would be saved with its whole storage
        return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def save_streamed(state: dict[str, torch.Tensor], load: Callable[[str], torch.Tensor],
                  path: Path) -> None:
    """The DCP files `_dcp_save({"model": state}, path)` writes for a state dict whose entry
    `name` is `load(name)` (`state` may hold meta tensors: only their shapes and dtypes are
    used), holding one loaded tensor at a time. One process. An error of `load` is raised as
    it is (DCP would wrap it in a multi-line CheckpointException)."""
    planner = _LoadingPlanner(load)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process
        try:
            dcp.save({"model": state}, storage_writer=_StreamingWriter(str(path)),
                     planner=planner)
        except CheckpointException:
            if planner.load_error is not None:
                raise planner.load_error from None
            raise


# ----------------------------------------------------------------------------------------------
# Save / resume / load


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's RNG states (CPU, and `device`'s on CUDA), as `rng_rank<R>.pt` holds them."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def begin(path_root: Path, step: int) -> tuple[Path, Path]:
    """(empty `.step_<step>.tmp/` every rank writes into, final `step_<step>/`); collective."""
    final = path_root / f"step_{step}"
    tmp = path_root / f".step_{step}.tmp"
    if rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    return tmp, final


def publish(tmp: Path, final: Path, meta: dict, keep_last: int = 0) -> None:
    """Rank 0, after every rank wrote its files: meta.json, then the manifest, then the rename;
    then all but the newest `keep_last` checkpoints are removed (0: keep all)."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    _VERIFIED.discard(final.resolve())
    os.replace(tmp, final)
    if keep_last:
        for old in prunable(final.parent, keep_last):
            shutil.rmtree(old, ignore_errors=True)


def prunable(root: Path, keep_last: int) -> list[Path]:
    """What `checkpoint.keep_last` removes: all but the newest `keep_last` good checkpoints and
    the newest `keep_last` diverged ones after them. A diverged run never prunes the good
    checkpoints it could be resumed from (rerun after rerun would otherwise replace them all)."""
    found = list_checkpoints(root)
    diverged = {p for p in found if is_diverged(p)}
    good = [p for p in found if p not in diverged]
    newest_good = step_of(good[-1]) if good else -1
    tail = [p for p in found if p in diverged and step_of(p) > newest_good]
    keep = set(good[-keep_last:]) | set(tail[-keep_last:])
    return [p for p in found if p not in keep]


def make_meta(step: int, cfg: Config, extra: dict) -> dict:
    """The meta.json of checkpoint `step` of this run, with `extra` (tokens, engine, ...)."""
    return {"step": step, "config_hash": config_hash(cfg), "arch_hash": arch_hash(cfg),
            "config": run_identity(cfg),
            "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "layout": {k: getattr(cfg.parallel, k) for k in
                       ("dp_replicate", "dp_shard", "tp", "pp", "ep", "zero_stage")},
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            **extra}


def save(path_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         cfg: Config, device: torch.device, extra: dict, keep_last: int = 0) -> Path:
    """Write checkpoint `step_<step>` under `path_root` (collective: every rank calls it)."""
    tmp, final = begin(path_root, step)
    model_sd, optim_sd = get_train_state(model, optimizer)
    _dcp_save({"model": model_sd, "optim": optim_sd}, tmp)
    torch.save(rng_state(device), tmp / f"rng_rank{rank()}.pt")
    barrier()
    if rank() == 0:
        publish(tmp, final, make_meta(step, cfg, extra), keep_last)
    barrier()
    return final


class AsyncSaver:
    """`checkpoint.async: true`: `dcp.async_save` copies the state to CPU memory (the only part
    the training loop waits for), then writes it in a background thread while training goes on;
    rank 0 publishes the checkpoint (meta.json, manifest, rename) from a helper thread once every
    rank's write and DCP's metadata are done. One save is in flight at a time: the next save, the
    final (synchronous) save and `close()` first wait for it, so nothing is lost at exit.

    The background writes coordinate over their own gloo group (created once, collectively, in
    the constructor): sharing the training group with the loop's collectives from another thread
    would interleave two streams of collectives on one communicator.
    """

    def __init__(self, timeout_s: float = 1800.0):
        import datetime
        from concurrent.futures import ThreadPoolExecutor
        self.group = (dist.new_group(backend="gloo",
                                     timeout=datetime.timedelta(seconds=timeout_s))
                      if dist.is_initialized() else None)
        if self.group is None:  # one process: DCP says it assumes so, from the writer thread
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtrain-ckpt")
        self._pending = None  # (step, tmp dir, Future of the publish)

    def save(self, path_root: Path, step: int, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device, extra: dict,
             keep_last: int = 0) -> Path:
        """Stage `step_<step>` and return; the write and the publish finish in the background.
        Raises the error of the previous save, if it failed (see `wait`)."""
        self.wait()
        tmp, final = begin(path_root, step)
        model_sd, optim_sd = get_train_state(model, optimizer)
        # Before the async save: every rank's RNG file exists once rank 0's save completes
        # (that completion needs every rank's background write to have started).
        torch.save(rng_state(device), tmp / f"rng_rank{rank()}.pt")
        upload = dcp.async_save({"model": model_sd, "optim": optim_sd},
                                checkpoint_id=str(tmp), process_group=self.group)
        meta, main = make_meta(step, cfg, extra), rank() == 0

        def finish() -> None:
            upload.result()
            if main:
                publish(tmp, final, meta, keep_last)
        self._pending = (step, tmp, self._pool.submit(finish))
        return final

    @property
    def in_flight(self) -> int | None:
        """The step of the save still being written, if any."""
        return self._pending[0] if self._pending and not self._pending[2].done() else None

    def wait(self) -> None:
        """Block until the save in flight is written and published. If it failed, its partial
        directory is removed and `AsyncSaveError` (naming the step) is raised."""
        if self._pending is None:
            return
        (step, tmp, future), self._pending = self._pending, None
        try:
            future.result()
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            if rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise AsyncSaveError(step, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


class AsyncSaveError(OSError):
    def __init__(self, step: int, cause: BaseException):
        last = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        super().__init__(f"background save of step {step} failed: {last}")
        self.step = step


def save_model(path_root: Path, step: int, model: torch.nn.Module, cfg: Config,
               extra: dict | None = None,
               load: Callable[[str], torch.Tensor] | None = None) -> Path:
    """Write a model-only checkpoint (no optimizer, no RNG): `"model_only": true` in meta.json.
    With `load`, `model` may be on the meta device: it gives the names, shapes and dtypes, and
    the value of each state-dict entry is `load(name)`, streamed (`save_streamed`)."""
    tmp, final = begin(path_root, step)
    if load is None:
        _dcp_save({"model": get_model_state_dict(model)}, tmp)
    else:
        save_streamed(get_model_state_dict(model), load, tmp)
    barrier()
    if rank() == 0:
        publish(tmp, final, make_meta(step, cfg, {"tokens": 0, **(extra or {}),
                                               "model_only": True}))
    barrier()
    return final


def find_resume(cfg: Config, log=None) -> Path | None:
    """The checkpoint to resume from: None for `none`; for `auto` the newest intact one under the
    checkpoint dir that verifies and was not written after non-finite steps (damaged newer ones
    are skipped with a warning naming them)."""
    r = cfg.checkpoint.resume
    if r == "none":
        return None
    if r != "auto":
        return Path(r)
    quiet = (lambda msg: None) if rank() else log
    return latest_good(checkpoint_dir(cfg), log=quiet)


def read_meta(path: Path) -> dict:
    """meta.json of a verified checkpoint (verifies it on first use in this process)."""
    path = Path(path)
    if path.resolve() not in _VERIFIED:
        verify(path)
    return read_json_object(path / "meta.json")


def load_model(path: Path, model: torch.nn.Module) -> dict:
    """Load only the model weights of checkpoint `path` into `model`; returns meta.json."""
    meta = read_meta(path)
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    return meta


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
         device: torch.device) -> dict:
    """Load model, optimizer and RNG state in place; returns meta.json. A model-only checkpoint
    leaves the optimizer and the RNG as they are."""
    meta = read_meta(path)
    if meta.get("model_only"):
        if meta.get("arch_hash") != arch_hash(cfg):
            raise ConfigError(f"checkpoint {path} holds a model of another architecture (arch "
                              f"hash {meta.get('arch_hash')} != {arch_hash(cfg)}); set the "
                              f"model section as in the config.yaml next to it")
        return load_model(path, model)
    check_same_run(meta, cfg, path)
    model_sd, optim_sd = get_train_state(model, optimizer, for_load=True)
    state = {"model": model_sd, "optim": optim_sd}
    _dcp_load(state, path)
    set_train_state(model, optimizer, state["model"], state["optim"])
    restore_rng(path, device)
    return meta


def restore_rng(path: Path, device: torch.device) -> None:
    """This rank's RNG state as a checkpoint saved it (`rng_rank<R>.pt`, tensors only), if any."""
    rng_file = Path(path) / f"rng_rank{rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
