"""Sharded Llama checkpoints: four shards written and read back, shard by shard, in bounded
host memory; a missing shard named; bf16 shards loaded as bf16 or cast on request.
"""

import json
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NO_PROCESSING, build_llama, flatten, hf_logits

from lowrank.models import (
    CheckpointError,
    available_locally,
    load_pretrained,
    open_state_dict,
    save_pretrained,
)
from lowrank.models import checkpoint as checkpoint_module

SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


def assert_same_tree(a, b):
    fa, fb = flatten(jax.device_get(a)), flatten(jax.device_get(b))
    assert set(fa) == set(fb)
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def peak_bytes(fn):
    """``fn()``'s result and the peak of the host memory traced while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def resave(source, directory, shards=4, dtype="auto"):
    """``source``'s checkpoint re-written by lowrank in ``shards`` files; its raw model."""
    raw = load_pretrained(source, dtype=dtype, tokenizer=False, **NO_PROCESSING)
    save_pretrained(raw.params, raw.config, directory, shards=shards)
    return raw


@pytest.fixture(scope="module")
def llama(rotary_checkpoint):
    return rotary_checkpoint("llama")


@pytest.fixture(scope="module")
def sharded(llama, tmp_path_factory):
    """The Llama test checkpoint in four shards (``save_pretrained(..., shards=4)``)."""
    path = tmp_path_factory.mktemp("llama_sharded")
    resave(llama.path, path)
    return path


def test_four_shards_written_and_read(llama, sharded, tokens):
    assert sorted(p.name for p in sharded.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", *SHARDS]
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == SHARDS
    sizes = [(sharded / name).stat().st_size for name in SHARDS]
    assert max(sizes) < 2 * min(sizes)  # about equal
    with open_state_dict(sharded) as sd:
        assert sorted(p.name for p in sd.files) == SHARDS
        assert index["metadata"]["total_size"] == sum(sd[k].nbytes for k in sd)
    for flags in ({}, NO_PROCESSING):  # processed (the default) and raw
        ours = load_pretrained(sharded, tokenizer=False, **flags)
        assert_same_tree(ours.params, load_pretrained(llama.path, tokenizer=False, **flags).params)
    np.testing.assert_allclose(
        np.asarray(load_pretrained(sharded, **NO_PROCESSING)(tokens)),
        hf_logits(llama, tokens),
        rtol=0,
        atol=1e-4,
    )


def test_transformers_loads_the_shards(llama, sharded, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(sharded, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_array_equal(ref, hf_logits(llama, tokens))


def test_each_tensor_is_read_once_from_its_shard(sharded, monkeypatch):
    """Loading reads every tensor once, each from the (memory-mapped) shard the index names."""
    reads = []
    get = checkpoint_module._SafetensorsFile.get

    def logged(self, key):
        reads.append((key, self.path.name))
        return get(self, key)

    monkeypatch.setattr(checkpoint_module._SafetensorsFile, "get", logged)
    load_pretrained(sharded, tokenizer=False)
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(reads) == sorted(weight_map.items())


def test_transformers_shards_load(llama, tmp_path):
    """Shards written by transformers' save_pretrained load as the single file does."""
    llama.hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 4
    ours = load_pretrained(tmp_path, tokenizer=False)
    assert_same_tree(ours.params, load_pretrained(llama.path, tokenizer=False).params)


def test_missing_shard_is_named(sharded, tmp_path):
    for name in ["config.json", "model.safetensors.index.json", *SHARDS[:2], SHARDS[3]]:
        (tmp_path / name).write_bytes((sharded / name).read_bytes())
    with pytest.raises(CheckpointError, match=f"missing checkpoint file '{tmp_path / SHARDS[2]}'"):
        load_pretrained(tmp_path)


def test_rewriting_replaces_the_other_form(llama, tmp_path):
    """One file after shards (or shards after one file) leaves no stale weights behind."""
    raw = resave(llama.path, tmp_path, shards=4)
    save_pretrained(raw.params, raw.config, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert_same_tree(load_pretrained(tmp_path, **NO_PROCESSING).params, raw.params)
    save_pretrained(raw.params, raw.config, tmp_path, shards=4)
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_tree(load_pretrained(tmp_path, **NO_PROCESSING).params, raw.params)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


def test_bf16_shards_load_as_bf16_or_cast(rotary_checkpoint, tmp_path):
    """A bf16 Llama checkpoint: float32 by default (exact values), bf16 with ``"auto"``."""
    bf16 = rotary_checkpoint("llama", "bfloat16")
    raw = resave(bf16.path, tmp_path)
    assert {x.dtype for x in flatten(raw.params).values()} == {jnp.dtype(jnp.bfloat16)}
    auto = load_pretrained(tmp_path, dtype="auto", tokenizer=False, **NO_PROCESSING)
    assert_same_tree(auto.params, raw.params)
    assert auto.dtype == jnp.bfloat16
    default = load_pretrained(tmp_path, tokenizer=False, **NO_PROCESSING)
    assert default.dtype == jnp.float32
    cast = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), raw.params)
    assert_same_tree(default.params, cast)
    half = load_pretrained(tmp_path, dtype=jnp.float16, tokenizer=False)  # processed, cast
    assert {x.dtype for x in flatten(half.params).values()} == {jnp.dtype(jnp.float16)}
    processed = load_pretrained(tmp_path, dtype="auto", tokenizer=False)
    assert processed.dtype == jnp.bfloat16 and processed.ln_folded
    with pytest.raises(TypeError, match="dtype must be a float dtype or 'auto', got 'bf16'"):
        load_pretrained(tmp_path, dtype="bf16")


@pytest.mark.parametrize(
    "storage, dtype, flags, bound",
    [
        # processed (1.57x here): the tree plus the leaves one processing step replaces
        ("float32", jnp.float32, {}, 2.0),
        # straight to bf16 (0.70x here: the embedding stays memory-mapped), no float32 copy
        ("bfloat16", "auto", NO_PROCESSING, 1.2),
    ],
)
def test_peak_host_memory_about_twice_the_weights(tmp_path, storage, dtype, flags, bound):
    """Reading four memory-mapped shards holds about one copy of the weights, plus what
    processing replaces: well under two copies.
    """
    import torch

    source = tmp_path / "source"
    sizes = dict(hidden_size=128, intermediate_size=256, vocab_size=4000)
    heads = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    build_llama(source, "llama", dtype=getattr(torch, storage), **sizes, **heads)
    resave(source, tmp_path / "sharded")
    model, peak = peak_bytes(
        lambda: load_pretrained(tmp_path / "sharded", dtype=dtype, place=lambda _p, x: x, **flags)
    )
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
    assert size > 2_000_000
    assert peak < bound * size, f"peak host memory {peak / size:.2f} x the weights"


def cache_snapshot(hub_cache, repo_id, directory, commit="0123456789abcdef" * 2 + "01234567"):
    """``directory``'s files as the hub cache's snapshot of ``repo_id`` at branch main."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_sharded_hub_snapshot_offline(sharded, tmp_path, monkeypatch):
    """A cached sharded snapshot is available offline only while every shard is cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    snapshot = cache_snapshot(tmp_path / "hub", "someorg/llama-sharded", sharded)
    assert available_locally("someorg/llama-sharded")
    ours = load_pretrained("someorg/llama-sharded", tokenizer=False)
    assert_same_tree(ours.params, load_pretrained(sharded, tokenizer=False).params)
    (snapshot / SHARDS[1]).unlink()
    assert not available_locally("someorg/llama-sharded")
    (snapshot / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x"}}')
    assert not available_locally("someorg/llama-sharded")
