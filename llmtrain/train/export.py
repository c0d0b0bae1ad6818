"""Hugging Face interoperability: `llmtrain export` (checkpoint -> HF directory) and
`llmtrain import-hf` (HF Llama or Mistral directory -> run directory with a model-only checkpoint).

Three HF architectures can express our decoder exactly:
  llama  rmsnorm, pre-LN, rope, swiglu (or geglu: hidden_act=gelu), MHA/GQA/MQA -> LlamaForCausalLM.
         Our rope pairs (i, i + head_dim/2) as HF's rotate_half does, so q/k need no permutation.
         model.rope_scaling is HF's `rope_parameters` (linear, dynamic, yarn, llama3).
  mistral  the llama layout with model.attention_window = HF's sliding_window (every layer; no
         biases) -> MistralForCausalLM, the same weight names.
  gpt2   layernorm, pre-LN, learned positions, gelu, biases, MHA                 -> GPT2LMHeadModel.
         GPT-2 stores projections as Conv1D ([in, out], the transpose of nn.Linear), fuses q, k, v
         into c_attn = [q; k; v], and defaults to the tanh GELU, so we write
         activation_function=gelu (exact, as ours).
Weights go to safetensors (never pickle), sharded above 5 GB with HF's index file; tied output
weights are stored once (HF drops lm_head.weight when tie_word_embeddings is true).

Both commands write into a temporary sibling of --out and move the result in at the end, so a
failure leaves --out as it was; a non-empty --out needs --overwrite, which replaces only the files
the command writes (a smaller export must not leave an older export's shards and index behind).
import-hf reads an untrusted directory: config.json is type- and range-checked, and the shard
headers are compared with the shapes it implies, before the model is built or a weight is read.
It never holds the model in memory: the model is built on the meta device (names, shapes), and
each weight is read from its own byte range of its shard, converted to fp32 and written to the
checkpoint before the next one is read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from llmtrain.config import Config, ConfigError, ModelConfig, TrainConfig, config_from_dict, \
    read_yaml_file, save_config, validate
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.rundir import RunDirLock

SAFETENSORS_INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors' names of the dtypes import-hf accepts
_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64}

# What each command writes into --out, and so what --overwrite replaces there.
_EXPORT_OWNS = re.compile(r"config\.json|generation_config\.json|model\.safetensors"
                          r"|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors"
                          r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json")
_IMPORT_OWNS = re.compile(r"config\.yaml|tokenizer\.json|checkpoints")

# Size limits of the files import-hf parses: far above real ones (config.json: a few KiB; the
# index of a 405B model: ~100 KiB; tokenizer.json: tens of MiB for a 256k vocabulary).
# safetensors itself refuses a shard header over 100 MB, and so does our reader.
_MAX_SAFETENSORS_HEADER = 100_000_000
_MAX_CONFIG_BYTES = 4 << 20
_MAX_INDEX_BYTES = 64 << 20
_MAX_TOKENIZER_BYTES = 512 << 20

# Ranges of the config.json integers import-hf reads: beyond any released Llama (405B: 126
# layers, hidden 16384, 128 heads, vocab 128256) and within llmtrain's model schema, so an absurd
# value is refused before anything is sized or looped by it.
_HF_INTS = {"num_hidden_layers": (1, 4096), "hidden_size": (1, 1 << 17),
            "intermediate_size": (1, 1 << 20), "num_attention_heads": (1, 1 << 14),
            "num_key_value_heads": (1, 1 << 14), "head_dim": (1, 1 << 17),
            "vocab_size": (2, 1 << 24), "max_position_embeddings": (1, 1 << 24),
            "original_max_position_embeddings": (1, 1 << 24), "sliding_window": (1, 1 << 24)}
# The model's rope cos/sin tables are [max_seq_len, head_dim] fp32 each, built with the model and
# not in the shards: at most 1 GiB apiece (e.g. 2M positions at head_dim 128).
_MAX_ROPE_ENTRIES = 1 << 28
_MAX_FACTOR = float(1 << 24)  # rope scaling factor: model.rope_scaling.factor's bound

# (our parameter, HF parameter) without the .weight/.bias suffix; {i} is the layer index.
_LLAMA_NAMES = [
    ("tok_embeddings", "model.embed_tokens"),
    ("layers.{i}.attention.wq", "model.layers.{i}.self_attn.q_proj"),
    ("layers.{i}.attention.wk", "model.layers.{i}.self_attn.k_proj"),
    ("layers.{i}.attention.wv", "model.layers.{i}.self_attn.v_proj"),
    ("layers.{i}.attention.wo", "model.layers.{i}.self_attn.o_proj"),
    ("layers.{i}.feed_forward.w1", "model.layers.{i}.mlp.gate_proj"),
    ("layers.{i}.feed_forward.w3", "model.layers.{i}.mlp.up_proj"),
    ("layers.{i}.feed_forward.w2", "model.layers.{i}.mlp.down_proj"),
    ("layers.{i}.attention_norm", "model.layers.{i}.input_layernorm"),
    ("layers.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm"),
    ("norm", "model.norm"),
    ("output", "lm_head"),
]
# wq/wk/wv are fused into c_attn separately; these are transposed when in _GPT2_CONV1D.
_GPT2_NAMES = [
    ("tok_embeddings", "transformer.wte"),
    ("pos_embeddings", "transformer.wpe"),
    ("layers.{i}.attention.wo", "transformer.h.{i}.attn.c_proj"),
    ("layers.{i}.feed_forward.w1", "transformer.h.{i}.mlp.c_fc"),
    ("layers.{i}.feed_forward.w2", "transformer.h.{i}.mlp.c_proj"),
    ("layers.{i}.attention_norm", "transformer.h.{i}.ln_1"),
    ("layers.{i}.ffn_norm", "transformer.h.{i}.ln_2"),
    ("norm", "transformer.ln_f"),
    ("output", "lm_head"),
]
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# The variants neither Llama nor GPT-2 computes. Some have no parameters of their own (LayerNorm
# Scaling, value residuals, the logit soft-cap), so the weight mapping would not notice them and an
# export would silently be another function.
_PLAIN = {"mixer": ("attention",), "residual": ("standard",), "ln_scaling": ("none",),
          "share_layers": (False,), "embedding_dim": (None,), "output": ("softmax",),
          "qk_norm": (False,), "value_residual": (False,), "logit_softcap": (0.0,)}
# What each HF architecture needs of model.*: key -> allowed values.
_NEEDS = {
    "llama": {"arch": ("decoder",), "norm": ("rmsnorm",), "norm_position": ("pre",),
              "position": ("rope",), "activation": ("swiglu", "geglu"), **_PLAIN},
    "gpt2": {"arch": ("decoder",), "norm": ("layernorm",), "norm_position": ("pre",),
             "position": ("learned",), "activation": ("gelu",), "bias": (True,), **_PLAIN},
}
_LLAMA_ACT = {"swiglu": "silu", "geglu": "gelu"}  # HF ACT2FN["gelu"] is the exact GELU


def _rename(name: str, table: list[tuple[str, str]], to_hf: bool = True) -> str | None:
    for ours, hf in table:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        pattern = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
        m = re.fullmatch(pattern + r"\.(?P<p>weight|bias)", name)
        if m:
            return dst.format(i=m.groupdict().get("i")) + "." + m["p"]
    return None


def hf_architecture(m: ModelConfig) -> str:
    """`llama`, `mistral` (llama with a sliding window) or `gpt2`, whichever expresses model
    config `m` exactly; else a ConfigError."""
    if m.attention_global_every:
        raise ConfigError(f"model.attention_global_every={m.attention_global_every} cannot be "
                          f"exported: Hugging Face Mistral slides its window in every layer; "
                          f"export a model with attention_global_every=0")
    if m.parametrization == "mup":  # refused rather than folded: see docs/mup.md
        raise ConfigError("model.parametrization=mup cannot be exported to Hugging Face: Llama "
                          "and GPT-2 have no readout multiplier 1/m or attention scale "
                          "~1/head_dim; export a parametrization=standard model")
    why = {}
    for arch, needs in _NEEDS.items():
        bad = [f"{k}={getattr(m, k)}" for k, ok in needs.items() if getattr(m, k) not in ok]
        if arch == "gpt2" and m.kv_heads != m.n_heads:
            bad.append(f"n_kv_heads={m.kv_heads} (GPT-2 has no grouped-query attention)")
        if arch == "gpt2" and m.attention_window:
            bad.append(f"attention_window={m.attention_window}")
        if arch == "llama" and m.attention_window and m.bias:
            bad.append("bias=true with attention_window (HF Mistral has no biases)")
        if getattr(m, "moe", None) is not None and m.moe.num_experts:
            bad.append(f"moe.num_experts={m.moe.num_experts}")
        if not bad:
            return "mistral" if arch == "llama" and m.attention_window else arch
        why[arch] = ", ".join(bad)
    raise ConfigError(
        "this model cannot be exported to Hugging Face: Llama needs rmsnorm, pre-LN, rope, "
        f"swiglu/geglu and no variant keys (model has {why['llama']}); GPT-2 needs layernorm, "
        f"pre-LN, learned positions, gelu and bias=true (model has {why['gpt2']})")


# ----------------------------------------------------------------------------------------------
# Our state dict <-> HF state dict


def to_hf_state_dict(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    m: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if m.tie_embeddings:
        sd.pop("output.weight")  # stored once, as the embedding
    out = {}
    if arch == "gpt2":
        for i in range(m.n_layers):
            for p in ("weight", "bias"):
                qkv = [sd.pop(f"layers.{i}.attention.{w}.{p}") for w in ("wq", "wk", "wv")]
                out[f"transformer.h.{i}.attn.c_attn.{p}"] = torch.cat(qkv)
    table = _GPT2_NAMES if arch == "gpt2" else _LLAMA_NAMES  # mistral: the llama names
    for name, t in sd.items():
        hf = _rename(name, table)
        if hf is None:
            raise ConfigError(f"parameter {name} has no {arch} counterpart")
        out[hf] = t
    if arch == "gpt2":
        out = {k: v.t() if k.endswith(_GPT2_CONV1D) else v for k, v in out.items()}
    return out


def hf_llama_name(name: str, m: ModelConfig) -> str:
    """The HF Llama weight our state-dict entry `name` comes from (tied: the output layer is the
    embedding, as in `from_hf_llama_state_dict`)."""
    if name == "output.weight" and m.tie_embeddings:
        return "model.embed_tokens.weight"
    hf = _rename(name, _LLAMA_NAMES)
    if hf is None:
        raise ConfigError(f"parameter {name} has no llama counterpart")
    return hf


def from_hf_llama_state_dict(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict:
    """Our state dict from a whole HF Llama one (import-hf renames one weight at a time with
    `hf_llama_name`; this is the reference its checkpoint is tested against)."""
    out = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports carry
            continue
        ours = _rename(name, _LLAMA_NAMES, to_hf=False)
        if ours is None:
            raise ConfigError(f"weight {name} of the Hugging Face checkpoint has no llmtrain "
                              f"counterpart")
        out[ours] = t
    if m.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# ----------------------------------------------------------------------------------------------
# HF config.json and tokenizer files


def hf_rope_parameters(m: ModelConfig) -> dict:
    """HF's `rope_parameters` for model config `m` (rope_theta and model.rope_scaling)."""
    s = m.rope_scaling
    params = {"rope_type": "default" if s.type == "none" else s.type, "rope_theta": m.rope_theta}
    if s.type != "none":
        params["factor"] = s.factor
    if s.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = s.original_max_position_embeddings
    if s.type == "yarn":
        params.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
        if s.attention_factor is not None:
            params["attention_factor"] = s.attention_factor
    if s.type == "llama3":
        params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    return params


def _hf_config(m: ModelConfig, arch: str, dtype: str, special: dict) -> dict:
    if arch in ("llama", "mistral"):
        rope = hf_rope_parameters(m)
        # HF's dynamic NTK reads the pretraining length from max_position_embeddings (and has no
        # cap on positions); the tokenizer keeps max_seq_len
        max_len = (m.rope_scaling.original_max_position_embeddings
                   if m.rope_scaling.type == "dynamic" else m.max_seq_len)
        biases = ({"sliding_window": m.attention_window} if arch == "mistral" else
                  {"attention_bias": m.bias, "mlp_bias": m.bias})
        return {"architectures": [f"{arch.capitalize()}ForCausalLM"], "model_type": arch,
                "vocab_size": m.vocab_size, "hidden_size": m.d_model,
                "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers,
                "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
                "head_dim": m.head_dim, "hidden_act": _LLAMA_ACT[m.activation],
                "max_position_embeddings": max_len, "rms_norm_eps": m.norm_eps,
                "rope_theta": m.rope_theta, "rope_parameters": rope,
                # transformers < 5 reads `rope_scaling` (5 prefers it when set: the same dict)
                "rope_scaling": None if rope["rope_type"] == "default" else rope,
                **biases, "attention_dropout": m.dropout,
                "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
                "torch_dtype": dtype, "use_cache": True, **special}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": m.vocab_size, "n_positions": m.max_seq_len, "n_embd": m.d_model,
            "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.ffn_dim,
            "activation_function": "gelu", "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": m.tie_embeddings,
            "initializer_range": m.init_std, "torch_dtype": dtype, "use_cache": True, **special}


def write_tokenizer(tok, out: Path, max_len: int) -> dict:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) for AutoTokenizer;
    returns the bos/eos/pad ids for config.json. Our corpora have one EOD token between
    documents and no BOS, so bos = eos = EOD, as GPT-2 does."""
    tok.save(out / "tokenizer.json")
    eos = tok.hf.id_to_token(tok.eod)
    pad = tok.hf.id_to_token(tok.pad) if tok.pad >= 0 else None
    special = {"bos_token": eos, "eos_token": eos, "pad_token": pad}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **special, "unk_token": None,
         "add_bos_token": False, "add_eos_token": False, "model_max_length": max_len,
         "clean_up_tokenization_spaces": False}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in special.items() if v is not None}, indent=1))
    return {"bos_token_id": tok.eod, "eos_token_id": tok.eod,
            "pad_token_id": tok.pad if tok.pad >= 0 else None}


# ----------------------------------------------------------------------------------------------
# safetensors, sharded as HF does


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not m:
        raise ConfigError(f"--max-shard-size={text!r} is not a size; use e.g. 5GB or 500MB")
    return int(float(m[1]) * 1000 ** " KMGT".index(m[2] or " "))


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path,
                      max_shard_bytes: int = 5 * 1000 ** 3) -> list[str]:
    """model.safetensors, or model-0000k-of-0000N.safetensors + model.safetensors.index.json when
    the weights exceed `max_shard_bytes` (HF's default 5 GB). Returns the file names."""
    from safetensors.torch import save_file
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous().clone()  # safetensors refuses shared storage
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, s in zip(names, shards) for n in s}}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=1))
    umask = _umask()
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o666 & ~umask)  # safetensors creates its files 0600
    return names


def safetensors_header(src: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, dtype) of every tensor of HF directory `src`, from the shard headers
    alone: model.safetensors, else the shards its index names (transformers' order). safe_open
    checks each header against its file's size, so a truncated shard is refused here."""
    from safetensors import SafetensorError, safe_open
    index = src / SAFETENSORS_INDEX
    if (src / "model.safetensors").is_file():
        weight_map, files = {}, ["model.safetensors"]
    elif index.is_file():
        weight_map = read_json(index, _MAX_INDEX_BYTES).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str)
                                                       for f in weight_map.values()):
            raise ConfigError(f"{index}: weight_map={_short(weight_map)} is not valid; expected "
                              f"an object of tensor name: shard file")
        files = sorted(set(weight_map.values()))
    else:
        raise ConfigError(f"{src} holds neither model.safetensors nor {SAFETENSORS_INDEX} "
                          f"(pickled pytorch_model.bin is not read: convert it to safetensors)")
    found = {}
    for name in files:
        path = src / name
        if Path(name).name != name or name in (".", "..") or not path.is_file():
            raise ConfigError(f"{index} names shard {_short(name)}, which is not a file in {src}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    found[key] = (path, tuple(tensor.get_shape()), tensor.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path} is not a valid safetensors file (truncated or damaged?): "
                              f"{_cut(str(e), 100)}") from None
    for key, name in weight_map.items():
        if found.get(key, (None,))[0] != src / name:
            raise ConfigError(f"{index} places {_short(key)} in {name}, which does not hold it")
    return found


def read_safetensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of HF directory `src` (see `safetensors_header` for which files), all in
    memory at once (import-hf reads one at a time: `read_tensor`)."""
    from safetensors.torch import load_file
    sd = {}
    for path in sorted({path for path, _, _ in safetensors_header(src).values()}):
        sd.update(load_file(str(path)))
    return sd


def _damaged(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path} is not a valid safetensors file (truncated or damaged?): {why}")


def read_shard_header(path: Path) -> tuple[int, int, dict]:
    """(file offset of the data, its length in bytes, the JSON header) of safetensors file
    `path`: an 8-byte little-endian length, then that many bytes of JSON, at most what
    safetensors itself accepts and within the file. Entries are checked as they are read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(_MAX_SAFETENSORS_HEADER, size - 8):
                raise _damaged(path, f"a header of {n} bytes in a file of {size}")
            raw = f.read(n)
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror}") from None
    try:
        header = json.loads(raw, parse_int=_json_int)
    except (ValueError, RecursionError):
        raise _damaged(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    return 8 + n, size - 8 - n, header


def read_tensor(path: Path, layout: tuple[int, int, dict], name: str,
                shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor `name` of safetensors file `path` (`layout`: its `read_shard_header`) as stored,
    read from its own byte range into new memory. Its header entry is checked first: a float
    dtype, `shape`, and offsets within the data spanning what that dtype and shape take."""
    start, length, header = layout
    entry = header.get(name)
    if not isinstance(entry, dict):
        raise _damaged(path, f"no tensor {_short(name)} in its header")
    dtype, offsets = _SAFETENSORS_FLOATS.get(entry.get("dtype")), entry.get("data_offsets")
    if dtype is None or entry.get("shape") != list(shape):
        raise _damaged(path, f"{_cut(name)} is {_short(entry.get('dtype'))} "
                             f"{_short(entry.get('shape'))}, not a float {list(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= length and offsets[1] - offsets[0] == nbytes):
        raise _damaged(path, f"{_cut(name)} has data_offsets={_short(offsets)}, not {nbytes} "
                             f"bytes within the {length} of data")
    tensor = torch.empty(shape, dtype=dtype)
    try:
        with open(path, "rb") as f:
            f.seek(start + offsets[0])
            read = f.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror}") from None
    if read != nbytes:  # the file shrank since its header was read
        raise _damaged(path, f"{_cut(name)} ends after {read} of its {nbytes} bytes")
    return tensor


# ----------------------------------------------------------------------------------------------
# --out: refused when used unless --overwrite; written through a temporary sibling


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_out_dir(out: Path, overwrite: bool, what: str) -> None:
    """Refuse an --out that is a file, or a directory holding anything unless --overwrite (which
    replaces `what` the command writes there)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace {what} there "
                          f"(other files are kept)")


@contextlib.contextmanager
def _staged(out: Path, owns: re.Pattern):
    """A temporary sibling of `out` to write into. When the body succeeds its entries replace the
    entries of `out` that `owns` matches (all of an earlier output, however it was sharded);
    when the body fails, `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates it 0700
        if not out.exists():
            os.replace(tmp, out)
            return
        for old in out.iterdir():
            if owns.fullmatch(old.name):
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        for new in tmp.iterdir():
            os.replace(new, out / new.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# export


def run_config(path: str | Path) -> Config:
    """The run config file `path`, type- and range-checked, its model section validated alone:
    the rest describes the training job (its ranks, batches, data), which neither export nor
    generate runs and which need not hold in this process (a layout for 64 GPUs, say)."""
    data = read_yaml_file(path, "run config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"run config {str(path)!r} must hold a mapping of sections, got "
                          f"{type(data).__name__}")
    cfg = config_from_dict(data)
    validate(Config(model=cfg.model, train=TrainConfig(seq_len=cfg.model.max_seq_len)))
    return cfg


def resolve_checkpoint(path: str | Path, config: str | Path | None = None,
                       check: Callable[[ModelConfig], object] | None = None
                       ) -> tuple[Path, Config, Path]:
    """(checkpoint dir, run config, dir of that config) for `path`: a checkpoint
    `<run>/checkpoints/step_N`, or a run dir, meaning its newest good checkpoint (the one
    `checkpoint.latest_good` picks: intact, not written after a diverged step). The config is
    `config`, else the run's config.yaml, read as for one process. `check(model config)` runs
    before any checkpoint is looked for or hashed."""
    p = Path(path)
    usage = "pass <run_dir> or <run_dir>/checkpoints/step_<N>"
    if not p.is_dir():
        why = "not a directory" if p.exists() else "it does not exist"
        raise ConfigError(f"{str(path)!r} is neither a checkpoint nor a run directory ({why}); "
                          f"{usage}")
    is_ckpt = (p / "meta.json").is_file()
    candidates = [p.parent.parent / "config.yaml", p.parent / "config.yaml"] if is_ckpt \
        else [p / "config.yaml"]
    config = config or next((c for c in candidates if c.is_file()), None)
    if config is None and not is_ckpt:
        raise ConfigError(f"{str(path)!r} is neither a checkpoint nor a run directory (no "
                          f"meta.json, no config.yaml); {usage}")
    if config is None:
        raise ConfigError(f"no config.yaml found for checkpoint {p} (looked at "
                          f"{', '.join(map(str, candidates))}); pass --config")
    cfg = run_config(config)
    if check is not None:
        check(cfg.model)
    if not is_ckpt:
        root = ckpt.checkpoint_dir(cfg) if cfg.checkpoint.dir else p / "checkpoints"
        p = ckpt.latest_good(root)
        if p is None:
            raise ConfigError(f"run {path} has no checkpoint under {root}; train it first or "
                              f"pass a checkpoint directory")
    return p, cfg, Path(config).parent


def run_tokenizer(cfg: Config, run_dir: Path | None = None):
    """The tokenizer a run trained with: <run_dir>/tokenizer.json, data.tokenizer, or the corpus
    cache (built again if missing)."""
    from llmtrain.data.tokenizer import Tokenizer
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        return Tokenizer.load(run_dir / "tokenizer.json")
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    from llmtrain.data.preprocess import prepare_corpus
    return prepare_corpus(cfg)[1]


def load_checkpoint_model(path: Path, cfg: Config,
                          device: torch.device | str = "cpu") -> torch.nn.Module:
    """Our model in fp32 on `device` with the weights of checkpoint `path` (verified first)."""
    from llmtrain.model import build_model
    model = build_model(cfg.model, device)
    ckpt.load_model(path, model)
    return model.eval()


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32",
              max_shard_bytes: int = 5 * 1000 ** 3, config: str | Path | None = None,
              overwrite: bool = False, log=print) -> Path:
    """Write checkpoint (dir or run dir) as a HF model directory `out`; returns `out`."""
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not valid; use one of {', '.join(_DTYPES)}")
    path, cfg, run_dir = resolve_checkpoint(checkpoint, config, check=hf_architecture)
    arch = hf_architecture(cfg.model)
    out = Path(out)
    check_out_dir(out, overwrite, "the Hugging Face files export writes")
    model = load_checkpoint_model(path, cfg)
    tok = run_tokenizer(cfg, run_dir)
    with _staged(out, _EXPORT_OWNS) as tmp:
        special = write_tokenizer(tok, tmp, cfg.model.max_seq_len)
        hf_cfg = _hf_config(cfg.model, arch, dtype, special)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=1))
        (tmp / "generation_config.json").write_text(json.dumps(
            {k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=1))
        tensors = {k: v.to(_DTYPES[dtype]) for k, v in to_hf_state_dict(model, arch).items()}
        files = write_safetensors(tensors, tmp, max_shard_bytes)
    log(f"exported {path} as {hf_cfg['architectures'][0]} ({dtype}, {len(files)} safetensors "
        f"file{'s' if len(files) > 1 else ''}) to {out}")
    return out


# ----------------------------------------------------------------------------------------------
# import-hf


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value) -> str:
    """repr of a value read from a file, cut to fit a one-line error."""
    return _cut(repr(value))


def _json_int(digits: str) -> int:
    if len(digits) > 20:  # int() is quadratic in the digits; no size here needs 20
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def read_json(path: Path, limit: int = _MAX_CONFIG_BYTES) -> dict:
    """The JSON object in file `path` of at most `limit` bytes; a ConfigError for anything else."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror}") from None
    if len(raw) > limit:
        raise ConfigError(f"{path} is larger than {limit >> 20} MiB, far more than such a file "
                          f"holds")
    try:
        data = json.loads(raw, parse_int=_json_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise ConfigError(f"{path} is not valid JSON: {_cut(str(e).splitlines()[0], 100)}") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


_REQUIRED = object()


def _hf_value(hf: dict, key: str, where: str, default=_REQUIRED):
    value = hf.get(key)
    if value is not None:
        return value
    if default is _REQUIRED:
        raise ConfigError(f"{where}: {key} is missing (or null); a Llama config.json sets it")
    return default


def _invalid(where: str, key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={_short(value)} is not valid; expected {expected}")


def _hf_int(hf: dict, key: str, where: str, default=_REQUIRED) -> int:
    lo, hi = _HF_INTS[key]
    value = _hf_value(hf, key, where, default)
    if type(value) is not int or not lo <= value <= hi:  # not a bool, float or string
        raise _invalid(where, key, value, f"an integer in [{lo}, {hi}]")
    return value


def _hf_number(hf: dict, key: str, where: str, default: float, lo: float,
               hi: float = math.inf, lo_open: bool = True) -> float:
    value = _hf_value(hf, key, where, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi == math.inf else ']'}"
        raise _invalid(where, key, value, f"a finite number in {interval}")
    return float(value)


def _hf_bool(hf: dict, key: str, where: str) -> bool:
    value = _hf_value(hf, key, where, False)
    if not isinstance(value, bool):
        raise _invalid(where, key, value, "true or false")
    return value


def _rope(hf: dict, where: str, max_len: int) -> tuple[float, dict, int]:
    """(rope_theta, model.rope_scaling, model.max_seq_len) of a HF config.json whose
    max_position_embeddings is `max_len`, read as transformers 5 reads it: `rope_scaling`, when
    set, in place of `rope_parameters`."""
    sections = {key: _hf_value(hf, key, where, {}) for key in ("rope_parameters", "rope_scaling")}
    for key, value in sections.items():
        if not isinstance(value, dict):
            raise _invalid(where, key, value, "an object or null")
    params = sections["rope_scaling"] or sections["rope_parameters"]
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise ConfigError(f"{where}: rope scaling {_short(kind)} is not supported; use default, "
                          f"linear, dynamic, yarn or llama3")
    theta = _hf_number({"rope_theta": params.get("rope_theta", hf.get("rope_theta"))},
                       "rope_theta", where, 10000.0, 0.0)
    if _hf_number(params, "partial_rotary_factor", where, 1.0, 0.0, 1.0) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor={params['partial_rotary_factor']} is "
                          f"not supported; llmtrain rotates the whole head")
    if kind == "default":
        return theta, {"type": "none"}, max_len
    scaling = {"type": kind}
    if kind == "dynamic":  # HF's pretraining length is max_position_embeddings, positions uncapped
        scaling["factor"] = _hf_number(params, "factor", where, _REQUIRED, 1.0, _MAX_FACTOR,
                                       lo_open=False)
        scaling["original_max_position_embeddings"] = max_len
        return theta, scaling, math.ceil(max_len * scaling["factor"])
    # yarn and llama3 default the pretraining length to max_position_embeddings (a top-level
    # original_max_position_embeddings first, as Phi-3 writes it); yarn its factor to their ratio
    original = _hf_int({"original_max_position_embeddings": hf.get(
        "original_max_position_embeddings", params.get("original_max_position_embeddings"))},
        "original_max_position_embeddings", where, max_len)
    default_factor = max_len / original if kind == "yarn" else _REQUIRED
    scaling["factor"] = _hf_number(params, "factor", where, default_factor, 1.0, _MAX_FACTOR,
                                   lo_open=False)
    if kind != "linear":
        scaling["original_max_position_embeddings"] = original
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            scaling[key] = _hf_number(params, key, where, _REQUIRED, 0.0)
    if kind == "yarn":
        if params.get("truncate", True) is not True:
            raise ConfigError(f"{where}: yarn truncate={_short(params['truncate'])} is not "
                              f"supported; llmtrain rounds the ramp outwards (truncate true)")
        # transformers: `beta_fast or 32`, `beta_slow or 1`
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
            scaling[key] = _hf_number(params, key, where, default, 0.0) if params.get(key) \
                else default
        factor = params.get("attention_factor")
        if factor is None and params.get("mscale") and params.get("mscale_all_dim"):
            # DeepSeek's form of YaRN's sqrt(1/t), as transformers computes it
            log_s = math.log(scaling["factor"]) if scaling["factor"] > 1 else 0.0
            m, m_all = (_hf_number(params, key, where, 1.0, 0.0)
                        for key in ("mscale", "mscale_all_dim"))
            factor = (0.1 * m * log_s + 1.0) / (0.1 * m_all * log_s + 1.0)
        if factor is not None:
            scaling["attention_factor"] = _hf_number({"attention_factor": factor},
                                                     "attention_factor", where, 1.0, 0.0)
    return theta, scaling, max_len


def model_config_from_hf(hf: dict, where: str = "config.json") -> dict:
    """model.* settings for a HF Llama or Mistral config.json (`where`, for errors): a
    ConfigError for a value of the wrong type or size, or anything llmtrain cannot express."""
    kind = hf.get("model_type")
    if kind not in ("llama", "mistral"):
        raise ConfigError(f"import-hf reads Llama and Mistral checkpoints (model_type llama or "
                          f"mistral); {where} has model_type={_short(kind)}")
    act = hf.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in _LLAMA_ACT.values():
        raise _invalid(where, "hidden_act", act, "silu (swiglu) or gelu (geglu)")
    size = {k: _hf_int(hf, k, where) for k in ("num_hidden_layers", "hidden_size",
                                                "intermediate_size", "num_attention_heads",
                                                "vocab_size")}
    d, heads = size["hidden_size"], size["num_attention_heads"]
    theta, scaling, max_len = _rope(hf, where, _hf_int(hf, "max_position_embeddings", where,
                                                       2048))
    if hf.get("head_dim") is not None and _hf_int(hf, "head_dim", where) != d // heads:
        raise ConfigError(f"{where}: head_dim={hf['head_dim']} != hidden_size / "
                          f"num_attention_heads={d // heads} is not supported")
    if max_len * (d // heads) > _MAX_ROPE_ENTRIES:
        raise ConfigError(f"{where}: {max_len} positions (max_position_embeddings, x factor for "
                          f"dynamic rope) x head dim {d // heads} is more than the "
                          f"{_MAX_ROPE_ENTRIES:,} rope table entries allowed")
    window = 0  # Llama has none; HF Mistral's sliding_window is 4096 when absent, null = none
    if kind == "mistral" and "sliding_window" not in hf:
        window = 4096
    elif kind == "mistral" and hf["sliding_window"] is not None:
        window = _hf_int(hf, "sliding_window", where)
    bias = _hf_bool(hf, "attention_bias", where)
    if _hf_bool(hf, "mlp_bias", where) != bias:
        raise ConfigError(f"{where}: attention_bias={bias} with mlp_bias={not bias} is not "
                          f"supported; llmtrain has one model.bias for both")
    return {"arch": "decoder", "n_layers": size["num_hidden_layers"], "d_model": d,
            "n_heads": heads, "n_kv_heads": _hf_int(hf, "num_key_value_heads", where, heads),
            "d_ff": size["intermediate_size"], "vocab_size": size["vocab_size"],
            "max_seq_len": max_len, "norm": "rmsnorm",
            "norm_eps": _hf_number(hf, "rms_norm_eps", where, 1e-6, 0.0, 1.0),
            "norm_position": "pre", "position": "rope", "rope_theta": theta,
            "rope_scaling": scaling, "attention_window": window,
            "activation": {v: k for k, v in _LLAMA_ACT.items()}[act], "bias": bias,
            "tie_embeddings": _hf_bool(hf, "tie_word_embeddings", where),
            "dropout": _hf_number(hf, "attention_dropout", where, 0.0, 0.0, 1.0, lo_open=False),
            "init_std": _hf_number(hf, "initializer_range", where, 0.02, 0.0)}


def hf_llama_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every weight of a HF Llama checkpoint with model config `m` (no lm_head
    when the embeddings are tied)."""
    d, q, kv, ff = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn_dim
    linear = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
              "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
              "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}
    shapes = {"model.embed_tokens.weight": (m.vocab_size, d), "model.norm.weight": (d,)}
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, d)
    for i in range(m.n_layers):
        for name, shape in linear.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
            if m.bias:
                shapes[f"model.layers.{i}.{name}.bias"] = shape[:1]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{i}.{norm}.weight"] = (d,)
    return shapes


def _few(names: list[str]) -> str:
    shown = ", ".join(_cut(n) for n in names[:2])
    return shown + (f" ({len(names)} in all)" if len(names) > 2 else "")


def check_llama_weights(found: dict[str, tuple[Path, tuple[int, ...], str]], m: ModelConfig,
                        src: Path) -> None:
    """The tensors `found` in the shards of `src` (see `safetensors_header`) are exactly those
    model config `m` needs, in its shapes and a float dtype; else a ConfigError naming a few."""
    want = hf_llama_shapes(m)
    # a tied checkpoint may still carry lm_head (HF ignores it); old ones carry a rope buffer
    allowed = {**want, **({"lm_head.weight": (m.vocab_size, m.d_model)} if m.tie_embeddings
                          else {})}
    found = {k: v for k, v in found.items() if not k.endswith("rotary_emb.inv_freq")}
    problems = []
    missing = [k for k in want if k not in found]
    unexpected = [k for k in found if k not in allowed]
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    problems += [f"{_cut(k)} is {list(found[k][1])}, config.json implies {list(shape)}"
                 for k, shape in allowed.items() if k in found and found[k][1] != shape][:2]
    problems += [f"{_cut(k)} is {_cut(dtype, 10)}, not a float dtype"
                 for k, (_, _, dtype) in found.items() if dtype not in _SAFETENSORS_FLOATS][:2]
    if problems:
        raise ConfigError(f"the weights in {src} do not fit its config.json: "
                          + "; ".join(problems))


def import_hf(src: str | Path, out: str | Path, overwrite: bool = False, log=print) -> Path:
    """HF Llama or Mistral directory `src` -> run directory `out`: config.yaml, tokenizer.json and a
    model-only checkpoint `checkpoints/step_0`. `llmtrain train out/config.yaml` continues.
    Everything is checked before the model is built (on the meta device); the weights are read,
    converted and written one at a time; `out` is written only at the end."""
    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.model import build_model
    src, out = Path(src), Path(out)
    where = src / "config.json"
    if not where.is_file():
        raise ConfigError(f"{src} is not a Hugging Face model directory (no config.json)")
    check_out_dir(out, overwrite, "the run import-hf writes (config.yaml, tokenizer.json, "
                                  "checkpoints/)")
    model_cfg = model_config_from_hf(read_json(where), str(where))
    try:
        cfg = config_from_dict({
            "model": model_cfg,
            "train": {"seq_len": min(128, model_cfg["max_seq_len"])},
            "data": {"tokenizer": str((out / "tokenizer.json").resolve())},
            "logging": {"run_dir": str(out)}})
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    tok_file = src / "tokenizer.json"
    if not tok_file.is_file():
        raise ConfigError(f"{src} has no tokenizer.json (a fast tokenizer is needed to train)")
    if tok_file.stat().st_size > _MAX_TOKENIZER_BYTES:
        raise ConfigError(f"{tok_file} is larger than {_MAX_TOKENIZER_BYTES >> 20} MiB")
    tok = Tokenizer.load(tok_file)  # fails early without an EOD token
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer of {src} has {tok.vocab_size} tokens, more than "
                          f"vocab_size={cfg.model.vocab_size}")
    found = safetensors_header(src)
    check_llama_weights(found, cfg.model, src)
    # names, shapes and dtypes of the state dict, no storage: nothing is initialised
    model = build_model(cfg.model, "meta")
    like = model.state_dict()
    layouts = {}

    def load(name: str) -> torch.Tensor:
        """Our entry `name`, read now and converted as load_state_dict would copy it in."""
        hf = hf_llama_name(name, cfg.model)
        path = found[hf][0]
        if path not in layouts:
            layouts[path] = read_shard_header(path)
        return read_tensor(path, layouts[path], hf, tuple(like[name].shape)).to(like[name].dtype)

    # the run dir's lock: --overwrite must not replace the checkpoints of a job training there
    # (a directory that does not exist yet has no job, and a failed import leaves none behind)
    lock = RunDirLock(out) if out.exists() else contextlib.nullcontext()
    with lock, _staged(out, _IMPORT_OWNS) as tmp:
        shutil.copyfile(tok_file, tmp / "tokenizer.json")
        save_config(cfg, tmp / "config.yaml")
        path = ckpt.save_model(tmp / "checkpoints", 0, model, cfg,
                               {"source": str(src.resolve())}, load=load)
    log(f"imported {src} ({model.num_params(non_embedding=False):,} parameters) into "
        f"{out / 'checkpoints' / path.name}; continue with: llmtrain train {out / 'config.yaml'}")
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def cmd_export(args: argparse.Namespace) -> int:
    export_hf(args.checkpoint, args.out, dtype=args.dtype,
              max_shard_bytes=parse_size(args.max_shard_size), config=args.config,
              overwrite=args.overwrite)
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    import_hf(args.directory, args.out, overwrite=args.overwrite)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face model directory",
        description="Write CHECKPOINT (<run>/checkpoints/step_N, or a run dir: its newest good "
                    "checkpoint) as config.json + safetensors + tokenizer files that "
                    "transformers' AutoModelForCausalLM / AutoTokenizer load (Llama or GPT-2 "
                    "layout, chosen from the model config).")
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (default hf)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32",
                   help="dtype of the exported weights (default float32)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split safetensors above this size (default 5GB)")
    p.add_argument("--config", help="run config (default: the run's config.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --out: replace the files an export writes there "
                        "(safetensors, index, config, tokenizer files), keep the others")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "import-hf", help="start a run from a Hugging Face Llama or Mistral checkpoint",
        description="Write run directory OUT (config.yaml from DIR/config.json, tokenizer.json, "
                    "and a model-only DCP checkpoint checkpoints/step_0) so that "
                    "`llmtrain train OUT/config.yaml` continues training DIR's weights.")
    p.add_argument("directory", metavar="DIR", help="HF model directory (config.json, "
                                                    "safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, metavar="OUT", help="run directory to create")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty OUT: replace its config.yaml, tokenizer.json and "
                        "checkpoints/, keep the other files")
    p.set_defaults(func=cmd_import_hf)
