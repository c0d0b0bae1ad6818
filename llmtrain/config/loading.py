"""A `Config` from YAML and `--set` overrides: bounded YAML reading, typed coercion against the
schema (schema.py) with range checks, and saving the resolved config into a run directory.

`load_config` is the one way in: read, override, build, fit the micro batch to the world size,
validate (validate.py). Every problem is a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llmtrain.config.errors import PRINTABLE_INT, ConfigError, clip, short
from llmtrain.config.layout import ParallelDims
from llmtrain.config.schema import Config
from llmtrain.config.validate import validate

# YAML spellings that differ from Python identifiers (`async` is a keyword).
_ALIASES = {"checkpoint.async": "checkpoint.async_save"}
_YAML_NAMES = {v: k for k, v in _ALIASES.items()}


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with typed errors


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    return {type(None): "null", int: "an integer", float: "a number", bool: "true/false",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _number(value: Any) -> int | float | None:
    """An int or float `value` as it is, a numeric string as a float (YAML 1.1 reads 3e-4 and
    1e6, without a dot, as strings), anything else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{path}={short(value)} is not valid; use one of: "
                          + ", ".join(str(c) for c in choices))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}={short(value)} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={short(value)} has the wrong type; expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            names = [f.name for f in dataclasses.fields(tp)]  # model has ~40: name a few
            keys = ", ".join(names[:8]) + (f", ... ({len(names)} keys)" if len(names) > 8 else "")
            raise ConfigError(f"{path}={short(value)} has the wrong type; expected a mapping of "
                              f"{keys}")
        return _build(tp, value, path)
    number = _number(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(number, int):
            return number  # its field's range bounds it
        if isinstance(number, float) and number.is_integer():
            return int(number)
    elif tp is float:
        if number is not None:
            try:
                number = float(number)
            except OverflowError:  # an int beyond 1e308
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{path}={short(value)} must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, float) or (isinstance(number, int) and abs(number) < PRINTABLE_INT):
            return str(value)
    raise ConfigError(f"{path}={short(value)} has the wrong type; expected {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, given_as = {}, {}
    for key, value in data.items():
        name = _field_name(prefix, key)
        if name not in names:
            raise ConfigError(_unknown_key_message(_yaml_path(prefix, clip(str(key))),
                                                   [_yaml_path(prefix, n) for n in names]))
        path = _yaml_path(prefix, name)
        if name in kwargs:  # `async` and its field name `async_save`
            raise ConfigError(f"{path} is given twice (as {given_as[name]} and {key}); keep one")
        kwargs[name], given_as[name] = _coerce(value, hints[name], path), key
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        _check_range(getattr(obj, f.name), f, _yaml_path(prefix, f.name))
    return obj


def _field_name(prefix: str, key: Any) -> Any:
    """The field a YAML key sets: the key itself, or the field of a YAML alias (`async`)."""
    alias = _ALIASES.get(f"{prefix}.{key}" if prefix else str(key))
    return alias.rsplit(".", 1)[-1] if alias else key


def _yaml_path(prefix: str, name: str) -> str:
    path = f"{prefix}.{name}" if prefix else name
    return _YAML_NAMES.get(path, path)


def _unknown_key_message(path: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown config key {path}{hint}"


def _check_range(value: Any, f: dataclasses.Field, path: str) -> None:
    """`value` (or each item of a list value) within its field's [lo, hi]."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(item, f, f"{path}[{i}]")
        return
    lo, hi, lo_open = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise ConfigError(f"{path}={short(value)} is out of range; must be {bound}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}={short(value)} is out of range; must be <= {hi}")


# ----------------------------------------------------------------------------------------------
# Reading YAML

# What a config may hold. A full config is ~130 values in ~4 KiB; these bounds leave orders of
# magnitude of room (long data.paths lists) and refuse what would hang or exhaust memory once the
# data is walked: an alias bomb ("billion laughs") expands to 10**9 values from 1 KiB of text.
_MAX_YAML_BYTES = 1 << 20  # 1 MiB
_MAX_YAML_VALUES = 100_000  # nodes, an aliased one counted at every use
_MAX_YAML_DEPTH = 32  # nested lists and mappings; a config nests 4 deep (data.blend)
_MAX_INT_DIGITS = 100  # int() of a long literal is quadratic, and refused beyond 4300 digits


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses, with a ConfigError naming `where` and the line, what would
    otherwise pass silently or blow up later: a key twice in one mapping (PyYAML keeps the last),
    aliases expanding to over _MAX_YAML_VALUES values or into themselves, nesting deeper than
    _MAX_YAML_DEPTH and huge integer literals. Aliases stay allowed (anchors are a fair way to
    repeat a section) but every use counts its whole subtree."""

    def __init__(self, text: str, where: str):
        super().__init__(text)
        self.where = where
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases expanded
        self._values = 0  # in the document so far, aliases expanded
        self._open: list[str | None] = []  # anchors of the nodes being composed, outermost first

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise ConfigError(f"{self.where}: alias *{clip(event.anchor)} at line {line} is "
                                  f"inside the list or mapping it names")
            node = super().compose_node(parent, index)  # composed (and sized) before
            self._count(self._sizes[id(node)], line, "YAML aliases expand to")
            return node
        if len(self._open) >= _MAX_YAML_DEPTH:
            raise ConfigError(f"{self.where}: nested more than {_MAX_YAML_DEPTH} levels deep at "
                              f"line {line}")
        self._count(1, line, "it holds")  # before composing: a long list stops early
        self._open.append(event.anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open.pop()
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair]
                    if isinstance(node, yaml.MappingNode) else [])
        self._sizes[id(node)] = 1 + sum(self._sizes[id(c)] for c in children)
        return node

    def _count(self, values: int, line: int, what: str) -> None:
        self._values += values
        if self._values > _MAX_YAML_VALUES:
            raise ConfigError(f"{self.where}: {what} more than {_MAX_YAML_VALUES} values at line "
                              f"{line}; a config needs far fewer")

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ConfigError:
            raise
        except (ValueError, OverflowError, TypeError) as e:  # `!!float abc`, the date 2024-13-45
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {clip(tag)} {short(node.value)} ({clip(str(e))})",
                node.start_mark) from None

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in with `<<: *base` may be set again: that is the point
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                twice = key in first_line
            except TypeError:
                continue  # an unhashable key, which SafeConstructor refuses
            if twice:
                raise ConfigError(f"{self.where}: key {short(key)} appears twice in one mapping "
                                  f"(lines {first_line[key]} and {line}); keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> int:
        digits = sum(c.isdigit() for c in self.construct_scalar(node))
        if digits > _MAX_INT_DIGITS:
            raise ConfigError(f"{self.where}: integer of {digits} digits at line "
                              f"{node.start_mark.line + 1}; config integers have at most "
                              f"{_MAX_INT_DIGITS}")
        return super().construct_yaml_int(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def parse_yaml(text: str, where: str) -> Any:
    """The data in the YAML `text` (None if it holds none), read by `_ConfigLoader`. `where`
    names the source in errors: malformed YAML raises yaml.YAMLError, the rest a ConfigError."""
    if len(text) > _MAX_YAML_BYTES:
        raise ConfigError(f"{where} is larger than 1 MiB; a run config is a few KiB")
    loader = _ConfigLoader(text, where)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The data in the YAML file at `path`, every problem with it a one-line ConfigError: not a
    readable regular file, over 1 MiB, not UTF-8, malformed YAML or refused by `_ConfigLoader`."""
    where = f"{what} {clip(repr(str(path)), 200)}"
    p = Path(path)
    try:
        if not p.is_file():
            problem = ("is a directory; pass a YAML file" if p.is_dir() else
                       "is not a regular file" if p.exists() else "does not exist")
            raise ConfigError(f"{where} {problem}")
        with p.open("rb") as fh:
            raw = fh.read(_MAX_YAML_BYTES + 1)
    except OSError as e:  # unreadable, or a name too long to look up
        raise ConfigError(f"{where} cannot be read: {e.strerror or e}") from None
    if len(raw) > _MAX_YAML_BYTES:
        raise ConfigError(f"{where} is larger than 1 MiB; a run config is a few KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    try:
        return parse_yaml(text, where)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML{_yaml_problem(e)}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """' at line N: what PyYAML found', one line and bounded ('' where it says nothing)."""
    mark = getattr(e, "problem_mark", None)
    said = [getattr(e, "context", None), getattr(e, "problem", None) or getattr(e, "reason", None)]
    text = " ".join(", ".join(str(s) for s in said if s).split())  # PyYAML's lines, joined
    return (f" at line {mark.line + 1}" if mark else "") + (f": {clip(text, 200)}" if text else "")


# ----------------------------------------------------------------------------------------------
# Loading, overrides, saving


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", typed c). The value is read as YAML, so 2, 1e-3, true and [1, 2] work."""
    if "=" not in item:
        raise ConfigError(f"--set {short(item)} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not all(key.split(".")):
        raise ConfigError(f"--set {short(item)} has an empty key; use section.key=value")
    try:
        value = parse_yaml(raw, f"--set {clip(key)}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML, e.g. a path with ": " in it: the plain string
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `data[a][b]...` for the dotted `key` (sections created as needed)."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {clip(key)}: {clip('.'.join(parts[:i + 1]))} is not a "
                              f"section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                world_size: int = 1, log=None) -> Config:
    """Read YAML at `path` (None = the embedded default), apply `--set` overrides, validate.
    `log` receives notices about values adjusted to the world size (see `fit_micro_batch`)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_file(path)
        if data is None:  # empty, or comments only
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {clip(repr(str(path)), 200)} must hold a mapping of "
                              f"sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, *parse_override(item))
    cfg = config_from_dict(data)
    fit_micro_batch(cfg, world_size, log)
    validate(cfg, world_size=world_size)
    return cfg


def fit_micro_batch(cfg: Config, world_size: int, log=None) -> None:
    """A micro batch larger than one data-parallel rank's share of the global batch is capped at
    that share, with a notice: the same config then runs on 1 process and under torchrun on N
    (the global batch, and so the training, stays the same; only accumulation changes)."""
    t = cfg.train
    dims = ParallelDims.from_config(cfg, world_size, strict=False)
    dp = dims.dp
    if not dims.fits or t.global_batch_size % dp or t.micro_batch_size * dp <= t.global_batch_size:
        return  # validate() reports layouts and batches that cannot be split
    per_rank = t.global_batch_size // dp
    if log is not None:
        log(f"notice: train.micro_batch_size={t.micro_batch_size} exceeds the "
            f"{per_rank} sequences per data-parallel rank (train.global_batch_size="
            f"{t.global_batch_size} over dp {dp}); using micro_batch_size={per_rank}")
    t.micro_batch_size = per_rank


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    data = cfg.to_dict()
    for alias, name in _ALIASES.items():
        section, key = name.split(".")
        data[section][alias.split(".")[1]] = data[section].pop(key)
    # replaced atomically: a half-written config.yaml (full disk) would misdescribe the run
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
