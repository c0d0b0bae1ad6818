"""Run configuration: a dataclass schema, YAML loading, `--set` overrides and validation.

A run is fully described by one `Config`. The dataclass defaults *are* the embedded default
(`configs/tiny.yaml` spells the same values out; a test keeps the two equal). Every error a user
can cause here is a `ConfigError` whose message is one line naming the key path, the value seen
and what would be valid; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmtrain.layout import stage_layer_ids


class ConfigError(ValueError):
    """A user error in a run configuration (one line, printed without a traceback)."""


def _f(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
       doc: str = "") -> Any:
    """A dataclass field with an optional numeric range [lo, hi] (or (lo, hi] with lo_open)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Upper bounds of the integers that size layers, buffers and loops. Each lies far beyond any real
# run (the largest published models have ~10**2 layers, d_model ~2**14, vocabularies ~2**18,
# contexts ~2**23 tokens, ~2**11 experts; jobs use ~10**5 GPUs and ~10**7 steps), so only a typo
# like 1e11 meets them, and it is refused before it sizes an allocation or a loop.
_LAYERS = 4096
_WIDTH = 2 ** 17  # d_model, embedding_dim
_HEADS = 2 ** 14
_FFN = 2 ** 20
_VOCAB = 2 ** 24
_TOKENS = 2 ** 24  # sequence lengths
_EXPERTS = 2 ** 16
_RANKS = 2 ** 20  # each degree of parallelism
_BATCH = 2 ** 24  # sequences per batch, micro-batches per step
_STEPS = 10 ** 10  # steps and step counts or intervals
_COUNT = 1024  # small counts: softmaxes mixed, data loader processes


@dataclass
class MoEConfig:
    num_experts: int = _f(0, lo=0, hi=_EXPERTS, doc="0 = dense FFN everywhere")
    top_k: int = _f(1, lo=1, hi=_EXPERTS)
    router: Literal["switch", "topk"] = "switch"
    # sizes each expert's buffer (capacity_factor * tokens / experts); >= num_experts keeps all
    capacity_factor: float = _f(1.25, lo=0.0, hi=_EXPERTS)
    aux_loss_coef: float = _f(0.01, lo=0.0)
    z_loss_coef: float = _f(0.001, lo=0.0)
    every_n_layers: int = _f(1, lo=1, hi=_LAYERS)
    n_shared_experts: int = _f(0, lo=0, hi=_EXPERTS)
    router_jitter: float = _f(0.0, lo=0.0, hi=1.0, doc="router input times U(1-eps, 1+eps)")
    aux_free_bias: bool = False  # DeepSeek-V3 aux-loss-free balancing (selection bias)
    bias_update_rate: float = _f(0.001, lo=0.0, doc="aux_free_bias step per update_bias()")


# Gated linear units (Shazeer 2020): activation(x W1) * (x W3). The one list of their names, which
# the model, the planner and the validator read (a copy that missed one under-counted its MLPs).
GLU_ACTIVATIONS = ("glu", "reglu", "geglu", "swiglu")


@dataclass
class ModelConfig:
    arch: Literal["decoder", "encoder_decoder"] = "decoder"
    n_layers: int = _f(4, lo=1, hi=_LAYERS)
    n_encoder_layers: int = _f(0, lo=0, hi=_LAYERS)
    n_decoder_layers: int = _f(0, lo=0, hi=_LAYERS)
    d_model: int = _f(128, lo=1, hi=_WIDTH)
    n_heads: int = _f(4, lo=1, hi=_HEADS)
    n_kv_heads: int | None = _f(None, lo=1, hi=_HEADS, doc="None = n_heads (MHA); 1 = MQA")
    d_ff: int | None = _f(None, lo=1, hi=_FFN,
                          doc="None = 4 * d_model (8/3 * d_model for GLU variants)")
    vocab_size: int = _f(4096, lo=2, hi=_VOCAB)
    max_seq_len: int = _f(256, lo=1, hi=_TOKENS)
    norm: Literal["layernorm", "rmsnorm", "none"] = "rmsnorm"
    norm_eps: float = _f(1e-5, lo=0.0, lo_open=True)
    norm_position: Literal["pre", "post", "deepnorm", "b2t"] = "pre"
    position: Literal["rope", "learned", "sinusoidal", "t5_relative", "none"] = "rope"
    rope_theta: float = _f(10000.0, lo=0.0, lo_open=True)
    activation: Literal["relu", "gelu", "silu", "elu", "selu", "glu", "reglu", "geglu",
                        "swiglu"] = "swiglu"
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = _f(0.0, lo=0.0, hi=1.0)
    init_std: float = _f(0.02, lo=0.0, lo_open=True)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # architecture variants (model/transformer.py, mixers.py, output.py; decoder-only)
    mixer: Literal["attention", "gmlp", "synthesizer_dense", "synthesizer_random"] = "attention"
    residual: Literal["standard", "rezero"] = "standard"
    init: Literal["default", "fixup"] = "default"
    ln_scaling: Literal["none", "inv_sqrt_depth"] = "none"
    embedding_dim: int | None = _f(None, lo=1, hi=_WIDTH,
                                   doc="None = d_model; < d_model: ALBERT factorised")
    share_layers: bool = False
    output: Literal["softmax", "mos"] = "softmax"
    mos_k: int = _f(4, lo=1, hi=_COUNT, doc="softmaxes mixed by output=mos")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation in GLU_ACTIVATIONS:
            # Shazeer 2020 keeps parameters equal to a 4*d_model MLP: 2/3 * 4 * d_model, rounded up to 8
            return (int(8 * self.d_model / 3) + 7) // 8 * 8
        return 4 * self.d_model


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(1, lo=1, hi=_RANKS)
    dp_shard: int = _f(-1, lo=-1, hi=_RANKS, doc="-1 = all ranks left over by the other dimensions")
    tp: int = _f(1, lo=1, hi=_RANKS)
    pp: int = _f(1, lo=1, hi=_RANKS)
    ep: int = _f(1, lo=1, hi=_RANKS)
    zero_stage: int = _f(0, lo=0, hi=3)
    sequence_parallel: bool = False
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    pp_microbatches: int = _f(0, lo=0, hi=_BATCH, doc="0 = global batch / micro batch")
    virtual_stages: int = _f(1, lo=1, hi=_LAYERS)
    pp_layers: list[int] | None = _f(None, hi=_LAYERS, doc="layers per stage (each item)")
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    compile: bool = False
    engine: Literal["torch", "deepspeed"] = "torch"
    offload: Literal["none", "cpu", "nvme"] = "none"
    deepspeed_config: str | None = None


@dataclass
class TrainConfig:
    steps: int = _f(300, lo=1, hi=_STEPS)
    global_batch_size: int = _f(16, lo=1, hi=_BATCH,
                                doc="sequences per optimizer step, all ranks together")
    micro_batch_size: int = _f(16, lo=1, hi=_BATCH, doc="sequences per forward pass on one rank")
    seq_len: int = _f(128, lo=2, hi=_TOKENS)
    precision: Literal["fp32", "bf16", "bf16_pure"] = "fp32"
    grad_clip: float = _f(1.0, lo=0.0, doc="0 = no clipping")
    # torch generators take 64 bits and the data order seeds with seed * 1_000_003 + epoch
    seed: int = _f(1234, lo=0, hi=2 ** 32 - 1)
    eval_every: int = _f(50, lo=0, hi=_STEPS, doc="0 = only at the end")
    eval_steps: int = _f(8, lo=1, hi=_STEPS)
    log_every: int = _f(10, lo=1, hi=_STEPS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_skipped_steps: int = _f(10, lo=1, hi=_STEPS)
    # 10**7 s (116 days): datetime.timedelta and threading waits overflow near 10**9 s
    collective_timeout_s: float = _f(600.0, lo=0.0, lo_open=True, hi=10 ** 7)


@dataclass
class OptimConfig:
    lr: float = _f(3e-3, lo=0.0, lo_open=True)
    min_lr: float = _f(3e-4, lo=0.0)
    weight_decay: float = _f(0.1, lo=0.0)
    beta1: float = _f(0.9, lo=0.0, hi=1.0)
    beta2: float = _f(0.95, lo=0.0, hi=1.0)
    eps: float = _f(1e-8, lo=0.0, lo_open=True)
    warmup_steps: int = _f(30, lo=0, hi=_STEPS)
    schedule: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd", "noam"] = "cosine"
    decay_steps: int | None = _f(None, lo=0, hi=_STEPS,
                                 doc="wsd: length of the final decay; others: steps from end of "
                                     "warmup to min_lr (None = until train.steps)")


@dataclass
class DataConfig:
    source: Literal["stdlib", "files", "indexed"] = "stdlib"
    paths: list[str] = _f([], doc="files/globs for source=files; .bin/.idx prefixes for indexed")
    blend: list[list[Any]] | None = None
    tokenizer: str | None = _f(None, doc="tokenizer.json or HF tokenizer dir; None = train BPE")
    split: str = "98,2,0"
    num_workers: int = _f(0, lo=0, hi=_COUNT)
    text_field: str = "text"
    cache_dir: str | None = _f(None, doc="None = $LLMTRAIN_CACHE or ~/.cache/llmtrain")
    reset_attention_at_eod: bool = False
    mask_eod_loss: bool = False
    source_field: str | None = None
    target_field: str | None = None
    skip_bad_lines: bool = _f(False, doc="skip malformed jsonl lines / non-UTF-8 text with a "
                              "counted warning instead of stopping on the first")


@dataclass
class CheckpointConfig:
    dir: str | None = _f(None, doc="None = <run_dir>/checkpoints")
    every: int = _f(100, lo=0, hi=_STEPS, doc="0 = only at the end")
    keep_last: int = _f(2, lo=0, hi=_STEPS, doc="0 = keep all")
    resume: str = _f("auto", doc="auto | none | PATH")
    async_save: bool = _f(False, doc="YAML key checkpoint.async: periodic saves are written "
                          "in the background (DCP async_save); the final save is synchronous")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/tiny"
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# YAML spellings that differ from Python identifiers (`async` is a keyword).
_ALIASES = {"checkpoint.async": "checkpoint.async_save"}
_YAML_NAMES = {v: k for k, v in _ALIASES.items()}


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with typed errors


_PRINTABLE_INT = 10 ** 30  # larger ints are shown by their size


class _BoundedRepr(reprlib.Repr):
    """repr() for messages: reprlib cuts long strings, lists and mappings; an integer too long
    to print (Python 3.11+ refuses str() beyond 4300 digits) is shown by its size."""

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) < _PRINTABLE_INT:
            return repr(x)
        sign = "negative " if x < 0 else ""
        return f"<{sign}integer of ~{int(x.bit_length() * math.log10(2)) + 1} digits>"


_repr = _BoundedRepr()
_repr.maxstring = _repr.maxother = 60
_short = _repr.repr


def _clip(text: str, limit: int = 80) -> str:
    """`text` (a key or path, printed without quotes) cut to about `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit - 20]}...{text[-15:]}"


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
        raise ConfigError(f"{path}={_short(value)} is not valid; use one of: "
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
        raise ConfigError(f"{path}={_short(value)} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={_short(value)} has the wrong type; expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={_short(value)} has the wrong type; expected a mapping of "
                              f"{', '.join(f.name for f in dataclasses.fields(tp))}")
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
                raise ConfigError(f"{path}={_short(value)} must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, float) or (isinstance(number, int) and abs(number) < _PRINTABLE_INT):
            return str(value)
    raise ConfigError(f"{path}={_short(value)} has the wrong type; expected {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, given_as = {}, {}
    for key, value in data.items():
        name = _field_name(prefix, key)
        if name not in names:
            raise ConfigError(_unknown_key_message(_yaml_path(prefix, _clip(str(key))),
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
        raise ConfigError(f"{path}={_short(value)} is out of range; must be {bound}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}={_short(value)} is out of range; must be <= {hi}")


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
                raise ConfigError(f"{self.where}: alias *{_clip(event.anchor)} at line {line} is "
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
                None, None, f"cannot read {_clip(tag)} {_short(node.value)} ({_clip(str(e))})",
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
                raise ConfigError(f"{self.where}: key {_short(key)} appears twice in one mapping "
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
    where = f"{what} {_clip(repr(str(path)), 200)}"
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
    return (f" at line {mark.line + 1}" if mark else "") + (f": {_clip(text, 200)}" if text else "")


# ----------------------------------------------------------------------------------------------
# Loading, overrides, saving


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", typed c). The value is read as YAML, so 2, 1e-3, true and [1, 2] work."""
    if "=" not in item:
        raise ConfigError(f"--set {_short(item)} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not all(key.split(".")):
        raise ConfigError(f"--set {_short(item)} has an empty key; use section.key=value")
    try:
        value = parse_yaml(raw, f"--set {_clip(key)}") if raw.strip() else ""
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
            raise ConfigError(f"--set {_clip(key)}: {_clip('.'.join(parts[:i + 1]))} is not a "
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
            raise ConfigError(f"config file {_clip(repr(str(path)), 200)} must hold a mapping of "
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
    dp = data_parallel_size(cfg, world_size)
    if dp < 1 or t.global_batch_size % dp or t.micro_batch_size * dp <= t.global_batch_size:
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


# ----------------------------------------------------------------------------------------------
# Cross-field validation


def _divisors(n: int) -> str:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]  # n may be 2**24
    return ", ".join(str(d) for d in sorted({*small, *(n // d for d in small)}))


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """dp = dp_replicate * dp_shard, with dp_shard = -1 resolved from the world size."""
    p = cfg.parallel
    if p.dp_shard == -1:
        other = p.pp * p.dp_replicate * p.tp
        return world_size // other * p.dp_replicate if world_size % other == 0 else 0
    return p.dp_replicate * p.dp_shard


def _validate_variants(cfg: Config) -> None:
    """The architecture variants (model.mixer, residual, init, ...) and what they compose with."""
    m, p = cfg.model, cfg.parallel
    variants = {"mixer": (m.mixer, "attention"), "residual": (m.residual, "standard"),
                "init": (m.init, "default"), "ln_scaling": (m.ln_scaling, "none"),
                "embedding_dim": (m.embedding_dim, None), "share_layers": (m.share_layers, False),
                "output": (m.output, "softmax")}
    changed = [f"model.{k}={v}" for k, (v, default) in variants.items() if v != default]
    if m.arch != "decoder" and changed:
        raise ConfigError(f"{changed[0]} is implemented for model.arch=decoder only; leave it at "
                          f"its default for model.arch={m.arch}")
    if m.norm == "none" and m.norm_position != "pre":
        raise ConfigError(f"model.norm=none needs model.norm_position=pre (without a norm the "
                          f"placements are the plain residual x + f(x)); got {m.norm_position}")
    if m.residual == "rezero" and m.norm_position != "pre":
        raise ConfigError(f"model.residual=rezero needs model.norm_position=pre (x + alpha * "
                          f"f(norm(x))); got {m.norm_position}")
    if m.init == "fixup" and m.norm != "none":
        raise ConfigError(f"model.init=fixup is an initialisation for models without "
                          f"normalisation; set model.norm=none (got {m.norm})")
    if m.ln_scaling != "none" and (m.norm == "none" or m.norm_position != "pre"):
        raise ConfigError(f"model.ln_scaling={m.ln_scaling} scales pre-LN outputs; needs "
                          f"model.norm_position=pre and a norm (got {m.norm_position}, {m.norm})")
    if m.embedding_dim is not None and m.embedding_dim >= m.d_model:
        raise ConfigError(f"model.embedding_dim={m.embedding_dim} must be below model.d_model="
                          f"{m.d_model} (ALBERT's factorised embedding) or null")
    if m.share_layers and (m.moe.num_experts or m.ln_scaling != "none"):
        raise ConfigError("model.share_layers=true cannot be combined with model.moe.num_experts "
                          "> 0 or model.ln_scaling (both differ per layer); use one of them")
    if m.moe.num_experts and m.activation in ("relu", "silu", "elu", "selu"):
        raise ConfigError(f"model.activation={m.activation} is not implemented for MoE experts; "
                          f"use gelu, glu, reglu, geglu or swiglu")
    if p.pp > 1:
        bad = [c for c in changed if c.split("=")[0] in
               ("model.share_layers", "model.embedding_dim", "model.output")]
        if bad:
            raise ConfigError(f"{bad[0]} with parallel.pp={p.pp} is not supported (pipeline "
                              f"stages split layers and embeddings); use pp=1")
    if p.tp > 1:
        bad = changed + (["model.norm=none"] if m.norm == "none" else [])
        bad = [c for c in bad if not c.startswith(("model.init=", "model.ln_scaling="))]
        if bad:
            raise ConfigError(f"{bad[0]} with parallel.tp={p.tp} is not supported (the tensor-"
                              f"parallel plan follows the Llama module names); use tp=1")


def _validate_pipeline(cfg: Config, dp: int) -> None:
    """Rules of parallel.pp > 1 (parallel/pipeline.py splits the decoder by layer ranges)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    stages = p.pp * p.virtual_stages
    if stages > m.n_layers:
        raise ConfigError(f"parallel.pp={p.pp} x parallel.virtual_stages={p.virtual_stages} = "
                          f"{stages} stages exceeds model.n_layers={m.n_layers}; every stage "
                          f"needs at least one layer")
    if p.pp_layers is not None and (len(p.pp_layers) != stages or sum(p.pp_layers) != m.n_layers
                                    or min(p.pp_layers) < 1):
        raise ConfigError(f"parallel.pp_layers={p.pp_layers} must hold pp x virtual_stages = "
                          f"{stages} counts of at least 1 that sum to model.n_layers={m.n_layers}")
    if p.pp_schedule == "interleaved_1f1b" and p.virtual_stages < 2:
        raise ConfigError(f"parallel.pp_schedule=interleaved_1f1b needs parallel.virtual_stages "
                          f">= 2, got {p.virtual_stages}; use 1f1b or raise virtual_stages")
    if p.virtual_stages > 1 and p.pp_schedule not in ("interleaved_1f1b", "zero_bubble"):
        raise ConfigError(f"parallel.virtual_stages={p.virtual_stages} needs "
                          f"parallel.pp_schedule=interleaved_1f1b or zero_bubble, got "
                          f"{p.pp_schedule}")
    per_rank = t.global_batch_size // dp
    n_mb = p.pp_microbatches or per_rank // t.micro_batch_size
    if per_rank % n_mb:
        raise ConfigError(f"parallel.pp_microbatches={p.pp_microbatches} does not divide the "
                          f"batch per data-parallel rank train.global_batch_size / dp = "
                          f"{per_rank}; use one of {_divisors(per_rank)}")
    if p.pp_schedule == "1f1b" and n_mb < p.pp:
        raise ConfigError(f"parallel.pp_schedule=1f1b needs at least parallel.pp={p.pp} "
                          f"micro-batches, got {n_mb} (parallel.pp_microbatches, 0 = "
                          f"global_batch_size / dp / micro_batch_size); raise it or use gpipe")
    if m.tie_embeddings:
        raise ConfigError("model.tie_embeddings=true with parallel.pp > 1 is not supported (the "
                          "embedding and the output layer live on different stages); set "
                          "model.tie_embeddings=false")
    if cfg.data.reset_attention_at_eod:
        raise ConfigError("data.reset_attention_at_eod with parallel.pp > 1 is not supported "
                          "yet (document ids are not sent between stages); use pp=1")
    if p.sequence_parallel and p.tp > 1:
        raise ConfigError("parallel.sequence_parallel with parallel.pp > 1 is not supported yet "
                          "(stages would exchange sequence shards); set it to false")


def _validate_expert_parallel(cfg: Config, world_size: int) -> None:
    m, p = cfg.model, cfg.parallel
    e = m.moe.num_experts
    if not e:
        raise ConfigError(f"parallel.ep={p.ep} needs an MoE model (model.moe.num_experts > 0)")
    if e % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide model.moe.num_experts={e}; use "
                          f"one of {_divisors(e)}")
    dp_shard = p.dp_shard if p.dp_shard > 0 else world_size // (p.pp * p.dp_replicate * p.tp)
    if dp_shard % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide the data-parallel shard size "
                          f"{dp_shard} (expert-parallel ranks are data-parallel ranks)")
    if p.zero_stage == 1:  # ZeRO-1 gives every expert weight one owner among its replicas
        per_layer = 3 if m.activation in GLU_ACTIVATIONS else 2

        def tensors_in(layer_ids) -> int:
            return per_layer * sum((i + 1) % m.moe.every_n_layers == 0 for i in layer_ids)
        if p.pp > 1:  # each stage partitions the experts of its own layers
            tensors = min([t for t in map(tensors_in, stage_layer_ids(cfg)) if t] or [0])
        else:
            stacks = ((m.n_encoder_layers, m.n_decoder_layers) if m.arch == "encoder_decoder"
                      else (m.n_layers,))
            tensors = sum(tensors_in(range(n)) for n in stacks)
        replicas = world_size // (p.pp * p.tp * p.ep)
        if 0 < tensors < replicas:
            where = " in the pipeline stage with the fewest" if p.pp > 1 else ""
            raise ConfigError(f"parallel.ep={p.ep} with zero_stage=1 splits the expert weights "
                              f"({tensors} tensors{where}) over the {replicas} ranks holding the "
                              f"same experts; each needs at least one: use zero_stage=0 or a "
                              f"larger ep")


def validate(cfg: Config, world_size: int = 1) -> None:
    m, t, p, o = cfg.model, cfg.train, cfg.parallel, cfg.optim
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
                          f"use one of {_divisors(m.d_model)}")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.kv_heads} does not divide model.n_heads="
                          f"{m.n_heads}; use one of {_divisors(m.n_heads)}")
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"position=rope needs an even head dim, got model.d_model/model.n_heads"
                          f"={m.head_dim}")
    if m.arch == "encoder_decoder":
        for key in ("n_encoder_layers", "n_decoder_layers"):
            if getattr(m, key) < 1:
                raise ConfigError(f"model.arch=encoder_decoder needs model.{key} >= 1, got "
                                  f"{getattr(m, key)}")
        if p.pp > 1:
            raise ConfigError(f"parallel.pp={p.pp} with model.arch=encoder_decoder is not "
                              f"supported; use pp=1")
        if p.tp > 1 and p.sequence_parallel:
            raise ConfigError(f"parallel.sequence_parallel with model.arch=encoder_decoder is not "
                              f"supported yet (parallel.tp={p.tp} works without it); use false")
    elif m.position in ("sinusoidal", "t5_relative"):
        raise ConfigError(f"model.position={m.position} is implemented for "
                          f"model.arch=encoder_decoder only; use rope, learned or none")
    _validate_variants(cfg)
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          f"use at most {m.max_seq_len} or raise model.max_seq_len")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} exceeds optim.lr={o.lr}")
    if m.moe.num_experts and m.moe.top_k > m.moe.num_experts:
        raise ConfigError(f"model.moe.top_k={m.moe.top_k} exceeds model.moe.num_experts="
                          f"{m.moe.num_experts}")
    if m.moe.num_experts and m.moe.router == "switch" and m.moe.top_k != 1:
        raise ConfigError(f"model.moe.router=switch routes top-1; got model.moe.top_k="
                          f"{m.moe.top_k}; use top_k=1 or router=topk")
    dims = p.pp * p.dp_replicate * p.tp * (p.dp_shard if p.dp_shard > 0 else 1)
    if world_size % dims or (p.dp_shard > 0 and dims != world_size):
        raise ConfigError(
            f"parallel layout pp={p.pp} x dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} "
            f"x tp={p.tp} = {dims} does not match the world size {world_size}")
    dp = data_parallel_size(cfg, world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}; use a "
            f"multiple of {t.micro_batch_size * dp}")
    if p.ep > 1:
        _validate_expert_parallel(cfg, world_size)
    if p.pp > 1:
        _validate_pipeline(cfg, dp)
    if p.engine == "deepspeed":
        # DeepSpeed's ZeRO shards over every rank and knows nothing of our DTensor TP, pipeline
        # stages or expert groups
        bad = [f"{k}={v}" for k, v in (("tp", p.tp), ("pp", p.pp), ("ep", p.ep),
                                       ("dp_replicate", p.dp_replicate)) if v != 1]
        if bad:
            raise ConfigError(f"parallel.engine=deepspeed runs data parallelism (ZeRO) only; got "
                              f"parallel.{', parallel.'.join(bad)}; set them to 1 or use "
                              f"parallel.engine=torch")
        if p.offload != "none" and p.zero_stage == 0:
            raise ConfigError(f"parallel.offload={p.offload} with engine=deepspeed needs "
                              f"parallel.zero_stage=1, 2 or 3, got 0")
    if m.n_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}; use "
                          f"{_divisors(m.n_heads)}")
    if m.kv_heads % p.tp and m.kv_heads != 1:
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.n_kv_heads={m.kv_heads}; use "
                          f"{_divisors(m.kv_heads)} (or n_kv_heads=1, whose kv head every tp rank "
                          f"keeps whole)")
    for key, n in (("model.vocab_size", m.vocab_size), ("model.d_ff", m.ffn_dim)):
        if n % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide {key}={n}; use one of "
                              f"{_divisors(n)}")
    if p.sequence_parallel and p.tp > 1 and t.seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel needs train.seq_len={t.seq_len} divisible "
                          f"by parallel.tp={p.tp}")
    if p.sequence_parallel and p.tp > 1 and m.position == "learned" and m.max_seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel with position=learned needs "
                          f"model.max_seq_len={m.max_seq_len} divisible by parallel.tp={p.tp}")
    if p.offload == "nvme" and p.engine != "deepspeed":
        raise ConfigError("parallel.offload=nvme needs parallel.engine=deepspeed; use none or cpu "
                          "with engine=torch")
    if p.offload == "cpu" and p.zero_stage != 3 and p.engine == "torch":
        raise ConfigError(f"parallel.offload=cpu needs parallel.zero_stage=3, got "
                          f"{p.zero_stage}")
    if p.activation_checkpointing == "selective":
        raise ConfigError("parallel.activation_checkpointing=selective is not supported yet; use "
                          "none or full")
    if p.compile:
        raise ConfigError("parallel.compile=true is not supported yet (per-block torch.compile "
                          "is planned with the GPU work); use false")
    if cfg.checkpoint.async_save and p.engine == "deepspeed":
        raise ConfigError("checkpoint.async=true is for parallel.engine=torch (DCP async_save); "
                          "the deepspeed engine writes its checkpoints synchronously: use false")
    if cfg.data.source_field or cfg.data.target_field:
        d = cfg.data
        if not (d.source_field and d.target_field):
            raise ConfigError(f"data.source_field={_short(d.source_field)} and data.target_field="
                              f"{_short(d.target_field)}: the sequence-to-sequence objective needs "
                              f"both")
        if m.arch != "encoder_decoder":
            raise ConfigError(f"data.source_field/target_field (sequence-to-sequence pairs) need "
                              f"model.arch=encoder_decoder, got {m.arch}")
        if d.source != "files" or d.blend:
            raise ConfigError(f"data.source_field/target_field read pairs from jsonl/parquet "
                              f"files: use data.source=files without data.blend (got "
                              f"data.source={d.source})")
    for i, entry in enumerate(cfg.data.blend or ()):
        if not _blend_entry_ok(entry):
            raise ConfigError(f"data.blend[{i}]={_short(entry)} is not valid; each entry is "
                              f"[weight, path] with a finite weight >= 0")
    if cfg.data.source != "stdlib" and not cfg.data.paths:
        raise ConfigError(f"data.source={cfg.data.source} needs data.paths (files or prefixes)")
    if cfg.checkpoint.resume not in ("auto", "none") and not _exists(cfg.checkpoint.resume):
        raise ConfigError(f"checkpoint.resume={_short(cfg.checkpoint.resume)} is neither auto, "
                          f"none nor an existing checkpoint directory")


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long to look up, or with a NUL in it
        return False


def _blend_entry_ok(entry: list[Any]) -> bool:
    if len(entry) != 2 or not isinstance(entry[1], str) or isinstance(entry[0], bool):
        return False
    try:
        return math.isfinite(entry[0]) and entry[0] >= 0
    except (TypeError, OverflowError):
        return False
