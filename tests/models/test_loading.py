"""load_pretrained: local directories, shards, pickle opt-in, hub cache, errors, memory."""

import copy
import json
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_gpt2, flatten, hf_logits

from lowrank.models import (
    CheckpointError,
    load_pretrained,
    load_tokenizer,
    open_state_dict,
    resolve_checkpoint,
)

NO_PROCESSING = dict(
    fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)


def assert_same_params(a, b):
    fa, fb = flatten(a.params), flatten(b.params)
    assert set(fa) == set(fb)
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def copy_checkpoint(src, dst, skip=()):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def gpt2_model(gpt2_checkpoint):
    return load_pretrained(gpt2_checkpoint.path)


def test_logits_match_hf(checkpoint, tokens):
    raw = load_pretrained(checkpoint.path, **NO_PROCESSING)
    ref = hf_logits(checkpoint, tokens)
    assert not raw.ln_folded
    np.testing.assert_allclose(np.asarray(raw(tokens)), ref, rtol=0, atol=1e-4)
    processed = load_pretrained(checkpoint.path)
    assert processed.ln_folded
    logits = np.asarray(processed(tokens))
    log_softmax = lambda x: np.asarray(jax.nn.log_softmax(jnp.asarray(x), -1))  # noqa: E731
    np.testing.assert_allclose(log_softmax(logits), log_softmax(ref), rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits, ref - ref.mean(-1, keepdims=True), rtol=0, atol=1e-4)


def test_flags_reach_processing(gpt2_checkpoint):
    m = load_pretrained(gpt2_checkpoint.path, fold_ln=False, center_unembed=False)
    assert not m.ln_folded and "ln1" in m.params["blocks"]
    assert np.abs(np.asarray(m.W_E).mean(-1)).max() < 1e-6  # writing weights centred
    assert np.abs(np.asarray(m.b_V)).max() == 0  # value biases folded
    assert np.abs(np.asarray(m.W_U).mean(-1)).max() > 1e-3  # unembed not centred


def test_sharded_safetensors(gpt2_checkpoint, gpt2_model, tmp_path):
    gpt2_checkpoint.hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_params(load_pretrained(tmp_path, tokenizer=False), gpt2_model)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing checkpoint file .*{shards[1].name}"):
        load_pretrained(tmp_path)


def test_pickle_needs_opt_in(gpt2_checkpoint, gpt2_model, tmp_path, monkeypatch):
    copy_checkpoint(gpt2_checkpoint.path, tmp_path, skip={"model.safetensors"})
    torch.save(gpt2_checkpoint.hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError,
        match=r"only PyTorch pickle weights \(pytorch_model"
        r"\.bin\).*allow_pickle=True",
    ):
        load_pretrained(tmp_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert_same_params(load_pretrained(tmp_path, allow_pickle=True), gpt2_model)
    assert calls and all(c.get("weights_only") is True for c in calls)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(gpt2_checkpoint, tmp_path, damage):
    copy_checkpoint(gpt2_checkpoint.path, tmp_path)
    target = tmp_path / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(
        b"\x00" * 3 + b"not safetensors" if damage == "garbage" else data[: len(data) // 2]
    )
    with pytest.raises(
        CheckpointError, match=f"could not read safetensors file '{target}'.*corrupt or truncated"
    ):
        load_pretrained(tmp_path)


def test_missing_files(gpt2_checkpoint, tmp_path):
    no_config = copy_checkpoint(gpt2_checkpoint.path, tmp_path / "a", skip={"config.json"})
    with pytest.raises(CheckpointError, match=r"missing file '.*/a/config\.json'"):
        load_pretrained(no_config)
    no_weights = copy_checkpoint(gpt2_checkpoint.path, tmp_path / "b", skip={"model.safetensors"})
    with pytest.raises(
        CheckpointError,
        match=r"no weights in '.*/b': expected model\."
        r"safetensors .*holds \['config\.json'",
    ):
        load_pretrained(no_weights)
    with pytest.raises(CheckpointError, match="no such directory: '/nonexistent/model/dir'"):
        load_pretrained("/nonexistent/model/dir")
    with pytest.raises(CheckpointError, match="is a file; pass the directory"):
        load_pretrained(gpt2_checkpoint.path / "config.json")


def test_config_and_weights_disagree(gpt2_checkpoint, tmp_path):
    copy_checkpoint(gpt2_checkpoint.path, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, n_embd=64)))
    with pytest.raises(
        CheckpointError,
        match=r"'transformer\.wte\.weight' has shape "
        r"\(101, 32\), expected \(101, 64\)",
    ):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, n_layer=2)))
    with pytest.raises(CheckpointError, match=r"unexpected key 'transformer\.h\.2\."):
        load_pretrained(tmp_path)


def test_base_model_without_lm_head(gpt2_checkpoint, tmp_path):
    """GPT2Model checkpoints: keys without 'transformer.', no lm_head, tied unembedding."""
    from transformers import GPT2Model

    gpt2_checkpoint.hf_model.transformer.save_pretrained(tmp_path)
    with open_state_dict(tmp_path) as sd:
        assert "wte.weight" in sd and not any(k.startswith("transformer.") for k in sd)
    model = load_pretrained(tmp_path, **NO_PROCESSING)
    assert model.config.architecture == "GPT2Model"
    np.testing.assert_array_equal(np.asarray(model.W_U), np.asarray(model.W_E).T)
    reference = load_pretrained(gpt2_checkpoint.path, **NO_PROCESSING, tokenizer=False)
    assert_same_params(model, reference)
    assert isinstance(gpt2_checkpoint.hf_model.transformer, GPT2Model)


def test_unknown_architecture(gpt2_checkpoint, tmp_path):
    copy_checkpoint(gpt2_checkpoint.path, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        load_pretrained(tmp_path)


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf_home" / "hub"


@pytest.mark.parametrize("name", ["gpt2", "EleutherAI/gpt-neo-125M"])
def test_hub_id_offline_not_cached(offline_empty_hub, name):
    with pytest.raises(
        CheckpointError,
        match=(
            f"'{name}' is not a local directory, and it is not in the Hugging Face cache "
            f"\\({offline_empty_hub}\\) while the hub is offline \\(HF_HUB_OFFLINE is set\\)\\. "
            f"To fix: download it once .*`hf download {name} config\\.json model\\.safetensors`"
            ".*or pass the path of a local directory holding config\\.json and model\\.safetensors"
        ),
    ):
        load_pretrained(name)


def test_hub_id_offline_from_cache(offline_empty_hub, gpt2_checkpoint, gpt2_model):
    """A hub id resolves through the local cache (the layout snapshot_download writes)."""
    repo = offline_empty_hub / "models--someorg--tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    copy_checkpoint(gpt2_checkpoint.path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_checkpoint("someorg/tiny-gpt2") == repo / "snapshots" / commit
    model = load_pretrained("someorg/tiny-gpt2")
    assert_same_params(model, gpt2_model)
    assert model.tokenizer is not None


def test_available_locally(offline_empty_hub, gpt2_checkpoint, tmp_path, monkeypatch):
    """True only where load_pretrained needs no network; never downloads."""
    from lowrank.models import EMBEDDED_MODEL, available_locally, loading

    def no_hub(*args, **kwargs):
        raise AssertionError("available_locally must not download")

    monkeypatch.setattr(loading, "_download", no_hub)
    assert available_locally(EMBEDDED_MODEL)
    assert available_locally(gpt2_checkpoint.path)
    assert not available_locally(tmp_path)  # a directory without config.json
    assert not available_locally(tmp_path / "missing")
    assert not available_locally("gpt2")  # the cache is empty
    assert not available_locally("not a valid id")
    repo = offline_empty_hub / "models--someorg--tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(gpt2_checkpoint.path / "config.json", snapshot)
    assert not available_locally("someorg/tiny-gpt2")  # config without weights
    shutil.copy(gpt2_checkpoint.path / "model.safetensors", snapshot)
    assert available_locally("someorg/tiny-gpt2")
    assert not available_locally("someorg/tiny-gpt2", revision="other")
    monkeypatch.setattr(loading, "EMBEDDED_MODEL", "no-such-model")
    assert not available_locally("no-such-model")


def test_invalid_hub_id(offline_empty_hub):
    with pytest.raises(CheckpointError, match="neither an existing local directory nor a valid"):
        load_pretrained("not a valid id")


def test_dtypes(gpt2_checkpoint, gpt2_model, tokens):
    half = load_pretrained(gpt2_checkpoint.path, dtype=jnp.bfloat16, tokenizer=False)
    assert {v.dtype for v in flatten(half.params).values()} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(
        np.asarray(half.W_Q), np.asarray(gpt2_model.W_Q).astype(jnp.bfloat16)
    )
    assert half(tokens).dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="dtype must be bfloat16, float16, float32 or float64"):
        load_pretrained(gpt2_checkpoint.path, dtype=jnp.int32)
    with pytest.raises(ValueError, match="float64 needs jax_enable_x64"):
        load_pretrained(gpt2_checkpoint.path, dtype=jnp.float64)


@pytest.mark.skipif(not hasattr(jax, "enable_x64"), reason="needs the jax.enable_x64 context")
def test_float64(gpt2_checkpoint, tokens):
    """Under x64, float64 parameters give float64 logits that match HF in double precision.

    (GPT-2: HF's GPT-Neo computes attention scores in float32 even for double weights.)
    """
    hf = copy.deepcopy(gpt2_checkpoint.hf_model).double()
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    with jax.enable_x64(True):
        model = load_pretrained(gpt2_checkpoint.path, dtype=jnp.float64, **NO_PROCESSING)
        logits = model(tokens)
        assert logits.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-9)
        assert model.OV.eigenvalues.dtype == jnp.complex128


def test_bfloat16_checkpoint(gpt2_checkpoint, tmp_path):
    """bf16 safetensors (which NumPy cannot name) are memory-mapped with ml_dtypes."""
    model = copy.deepcopy(gpt2_checkpoint.hf_model).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, **NO_PROCESSING)
    assert loaded.dtype == jnp.float32
    ref = model.transformer.wte.weight.float().detach().numpy()
    np.testing.assert_array_equal(np.asarray(loaded.W_E), ref)
    with open_state_dict(tmp_path) as sd:
        wte = sd["transformer.wte.weight"]
        assert wte.dtype == jnp.bfloat16 and isinstance(wte, np.memmap)


def test_place_hook(gpt2_checkpoint, gpt2_model):
    seen = []
    device = jax.devices()[1]

    def place(path, x):
        seen.append((path, x.dtype))
        return jax.device_put(x, device)

    m = load_pretrained(gpt2_checkpoint.path, place=place, tokenizer=False)
    assert sorted(p for p, _ in seen) == sorted(flatten(m.params))
    assert {dt for _, dt in seen} == {np.dtype(np.float32)}
    assert all(leaf.devices() == {device} for leaf in jax.tree_util.tree_leaves(m))
    assert_same_params(m, gpt2_model)


def test_tokenizer_loading(gpt2_checkpoint, gpt_neo_checkpoint, tmp_path):
    assert load_tokenizer(gpt2_checkpoint.path) is not None
    assert load_tokenizer(gpt_neo_checkpoint.path) is None
    broken = copy_checkpoint(gpt2_checkpoint.path, tmp_path)
    (broken / "tokenizer.json").write_text("{broken")
    with pytest.warns(UserWarning, match="could not load the tokenizer"):
        model = load_pretrained(broken)
    assert model.tokenizer is None
    assert load_pretrained(gpt2_checkpoint.path, tokenizer=False).tokenizer is None


def test_lazy_state_dict(gpt2_checkpoint):
    with open_state_dict(gpt2_checkpoint.path) as sd:
        assert len(sd) == 3 * 12 + 4
        assert "transformer.h.2.mlp.c_fc.weight" in sd
        assert sd.files == [gpt2_checkpoint.path / "model.safetensors"]
        wte = sd["transformer.wte.weight"]
        assert isinstance(wte, np.ndarray) and wte.shape == (101, 32)


def test_peak_host_memory_about_twice_the_weights(tmp_path):
    """Reading, converting and processing hold well under two copies of the weights.

    (1.56x here: the tree, plus the leaves one processing step replaces.)
    """
    build_gpt2(tmp_path, n_layer=4, n_embd=128, vocab_size=4000, n_positions=64)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        model = load_pretrained(tmp_path, place=lambda _path, x: x)  # keep NumPy leaves
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(model))
    assert size > 4_000_000
    assert peak < 1.8 * size, f"peak host memory {peak / size:.2f} x the weights"


def test_embedded_model_by_default_and_by_name(monkeypatch):
    """load_pretrained() and load_pretrained("induction-2l") read the package data, offline."""
    from lowrank.models import EMBEDDED_MODEL, embedded_model_path, loading

    def no_hub(*args, **kwargs):
        raise AssertionError("the embedded model must not touch the hub")

    monkeypatch.setattr(loading, "_download", no_hub)
    path = embedded_model_path()
    assert path.is_dir() and (path / "model.safetensors").is_file()
    assert resolve_checkpoint(EMBEDDED_MODEL) == path
    default = load_pretrained()
    assert default.ln_folded and default.tokenizer is not None  # default processing
    assert_same_params(default, load_pretrained(EMBEDDED_MODEL))
    assert_same_params(default, load_pretrained(path))
    raw = load_pretrained(**NO_PROCESSING)
    assert not raw.ln_folded


def test_local_directory_shadows_embedded_name(monkeypatch, tmp_path, gpt2_checkpoint):
    from lowrank.models import EMBEDDED_MODEL

    copy_checkpoint(gpt2_checkpoint.path, tmp_path / EMBEDDED_MODEL)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(EMBEDDED_MODEL).resolve() == (tmp_path / EMBEDDED_MODEL).resolve()
    assert load_pretrained(EMBEDDED_MODEL).config.n_layers == 3  # the local checkpoint


def test_missing_embedded_model_says_how_to_rebuild(monkeypatch):
    from lowrank.models import embedded_model_path, loading

    monkeypatch.setattr(loading, "EMBEDDED_MODEL", "no-such-model")
    with pytest.raises(CheckpointError, match="python -m lowrank.data.train_embedded"):
        embedded_model_path()
