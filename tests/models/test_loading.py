"""load_pretrained: local directories, shards, pickle opt-in, hub cache, errors, memory."""

import copy
import json
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import log_softmax
from conftest import NO_PROCESSING, build_gpt2, flatten, hf_logits

from lowrank.models import (
    EMBEDDED_MODEL,
    CheckpointError,
    available_locally,
    embedded_model_path,
    load_pretrained,
    load_tokenizer,
    open_state_dict,
    resolve_checkpoint,
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
    import torch

    copy_checkpoint(gpt2_checkpoint.path, tmp_path, skip={"model.safetensors"})
    torch.save(gpt2_checkpoint.hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError,
        match=r"only PyTorch pickle weights \(pytorch_model\.bin\).*if you trust the files, "
        r"pass allow_pickle=True \(command line: --allow-pickle;",
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
        match=r"no weights in '.*/b': expected model\.safetensors .*\(or pytorch_model\.bin "
        r"with allow_pickle=True, command line --allow-pickle\); the directory holds "
        r"\['config\.json'",
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

    # A copy: save_pretrained sets config.architectures, shared with the session fixture.
    copy.deepcopy(gpt2_checkpoint.hf_model.transformer).save_pretrained(tmp_path)
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
    config.update(architectures=["OPTForCausalLM"], model_type="opt")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'OPTForCausalLM'"):
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
    from lowrank.models import EMBEDDED_MODEL, available_locally, hub

    def no_hub(*args, **kwargs):
        raise AssertionError("available_locally must not download")

    monkeypatch.setattr(hub, "_download", no_hub)
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
    monkeypatch.setattr(hub, "EMBEDDED_MODEL", "no-such-model")
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
    import torch

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
    import torch

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
    from lowrank.models import EMBEDDED_MODEL, embedded_model_path, hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the embedded model must not touch the hub")

    monkeypatch.setattr(hub, "_download", no_hub)
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
    from lowrank.models import embedded_model_path, hub

    monkeypatch.setattr(hub, "EMBEDDED_MODEL", "no-such-model")
    with pytest.raises(CheckpointError, match="python -m lowrank.data.train_embedded"):
        embedded_model_path()


# ----------------------------------------------------------------- hostile checkpoints
def sharded_checkpoint(ckpt, path):
    """``ckpt`` saved as several safetensors shards in ``path``; returns its index dict."""
    ckpt.hf_model.save_pretrained(path, max_shard_size="40KB")
    shutil.copy(ckpt.path / "config.json", path / "config.json")
    return json.loads((path / "model.safetensors.index.json").read_text())


def outside_message(directory, name):
    return (
        f"shard index '{directory / 'model.safetensors.index.json'}' names {name!r}, which is "
        f"not a file inside the checkpoint directory '{directory}'; shards must be named "
        "relative to it"
    )


@pytest.mark.parametrize("form", ["absolute", "dotdot", "symlink", "symlinked_dir"])
def test_shard_outside_the_checkpoint(gpt2_checkpoint, tmp_path, form):
    """An index naming a file outside the checkpoint is refused, whether the file exists
    or not, with the same message (which does not tell them apart).
    """
    ckpt = tmp_path / "ckpt"
    index = sharded_checkpoint(gpt2_checkpoint, ckpt)
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / shard  # a real shard, so following the name would load it
    name = {
        "absolute": str(secret),
        "dotdot": f"../outside/{shard}",
        "symlink": "evil.safetensors",
        "symlinked_dir": f"evil_dir/{shard}",
    }[form]
    if form == "symlink":
        (ckpt / name).symlink_to(secret)
    if form == "symlinked_dir":
        (ckpt / "evil_dir").symlink_to(outside, target_is_directory=True)
    weight_map = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    messages = []
    for exists in (True, False):
        if exists:
            shutil.copy(ckpt / shard, secret)
        else:
            secret.unlink()
        with pytest.raises(CheckpointError) as info:
            load_pretrained(ckpt, tokenizer=False)
        messages.append(str(info.value))
    assert messages == [outside_message(ckpt, name)] * 2


def test_shard_inside_the_checkpoint_via_symlink(gpt2_checkpoint, gpt2_model, tmp_path):
    """Names that resolve inside the directory still load: subfolders, ``x/../y``, links
    between files of the checkpoint, and a checkpoint directory reached through a link.
    """
    ckpt = tmp_path / "ckpt"
    index = sharded_checkpoint(gpt2_checkpoint, ckpt)
    first, second, *_ = sorted(set(index["weight_map"].values()))
    (ckpt / "sub").mkdir()
    shutil.move(ckpt / first, ckpt / "sub" / first)
    (ckpt / "link.safetensors").symlink_to(ckpt / second)
    rename = {first: f"sub/{first}", second: "sub/../link.safetensors"}
    weight_map = {k: rename.get(v, v) for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "alias").symlink_to(ckpt, target_is_directory=True)
    assert_same_params(load_pretrained(tmp_path / "alias", tokenizer=False), gpt2_model)


def test_sharded_hub_cache_snapshot(offline_empty_hub, gpt2_checkpoint, gpt2_model, tmp_path):
    """The hub cache's snapshot files are symlinks into the repository's blobs: allowed."""
    build = tmp_path / "build"
    sharded_checkpoint(gpt2_checkpoint, build)
    repo = offline_empty_hub / "models--someorg--sharded"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(build.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert_same_params(load_pretrained("someorg/sharded", tokenizer=False), gpt2_model)


@pytest.mark.parametrize(
    "index, found",
    [
        ([1, 2], "no weight_map object"),
        ({"metadata": {}}, "no weight_map object"),
        ({"weight_map": ["model-1.safetensors"]}, "no weight_map object"),
        ({"weight_map": {}}, "no weight_map object"),
        ({"weight_map": {"wte.weight": 5}}, "entry 'wte.weight': 5"),
        ({"weight_map": {"wte.weight": ""}}, "entry 'wte.weight': ''"),
        ({"weight_map": {"wte.weight": None}}, "entry 'wte.weight': None"),
        ({"weight_map": {"": "model-1.safetensors"}}, "entry '': 'model-1.safetensors'"),
    ],
)
def test_malformed_shard_index(gpt2_checkpoint, tmp_path, index, found):
    copy_checkpoint(gpt2_checkpoint.path, tmp_path, skip={"model.safetensors"})
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path)
    assert str(info.value) == (
        f"malformed shard index '{path}': expected a non-empty \"weight_map\" object mapping "
        f"tensor names to shard file names (non-empty strings); found {found}"
    )


def test_deeply_nested_shard_index(gpt2_checkpoint, tmp_path):
    copy_checkpoint(gpt2_checkpoint.path, tmp_path, skip={"model.safetensors"})
    path = tmp_path / "model.safetensors.index.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=f"could not read shard index '{path}': Recursion"):
        load_pretrained(tmp_path)


REVISION_MESSAGE = (
    "revision must be a branch or tag name (such as 'main', 'v1.0' or 'refs/pr/1') or a "
    "commit hash, got "
)


@pytest.mark.parametrize(
    "revision, got",
    [
        ("../../../etc", "'../../../etc' (str)"),
        ("refs/../../x", "'refs/../../x' (str)"),
        ("/abs", "'/abs' (str)"),
        ("main/", "'main/' (str)"),
        ("a//b", "'a//b' (str)"),
        (".hidden", "'.hidden' (str)"),
        ("a\\b", "'a\\\\b' (str)"),
        ("main branch", "'main branch' (str)"),
        ("main\n", "'main\\n' (str)"),
        ("ma\x00in", "'ma\\x00in' (str)"),
        ("", "'' (str)"),
        (5, "5 (int)"),
        (b"main", "b'main' (bytes)"),
        (["main"], "['main'] (list)"),
    ],
)
def test_bad_revision(offline_empty_hub, gpt2_checkpoint, revision, got):
    """Checked before it reaches the hub cache, where it would become a path."""
    calls = [
        lambda: load_pretrained("someorg/tiny-gpt2", revision=revision),
        lambda: load_pretrained(gpt2_checkpoint.path, revision=revision),
        lambda: resolve_checkpoint("someorg/tiny-gpt2", revision=revision),
        lambda: available_locally("someorg/tiny-gpt2", revision=revision),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert type(info.value) is ValueError
        assert str(info.value) == REVISION_MESSAGE + got


@pytest.mark.parametrize(
    "revision", ["main", "v1.0", "refs/pr/1", "my-branch_2", "0123456789abcdef" * 2 + "01234567"]
)
def test_good_revisions_reach_the_cache(offline_empty_hub, revision):
    assert not available_locally("someorg/tiny-gpt2", revision=revision)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_checkpoint("someorg/tiny-gpt2", revision=revision)


def save_with(ckpt, path, key, value):
    """``ckpt`` in ``path`` with tensor ``key`` replaced by ``value`` (a NumPy array)."""
    from safetensors.numpy import load_file, save_file

    copy_checkpoint(ckpt.path, path)
    tensors = load_file(path / "model.safetensors")
    tensors[key] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_integer_tensor_is_an_error(gpt2_checkpoint, tmp_path, dtype):
    save_with(gpt2_checkpoint, tmp_path, "transformer.ln_f.weight", np.ones(32, dtype=dtype))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path)
    assert str(info.value) == (
        f"GPT-2 state dict: key 'transformer.ln_f.weight' has dtype {np.dtype(dtype)}, "
        "expected a floating-point dtype (float32, float16, bfloat16 or float64)"
    )


def test_float64_beyond_float32_is_an_error(gpt2_checkpoint, tmp_path):
    wte = np.zeros((101, 32))
    wte[3, 4] = -1e300
    save_with(gpt2_checkpoint, tmp_path, "transformer.wte.weight", wte)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path)
    assert str(info.value) == (
        "GPT-2 state dict: key 'transformer.wte.weight' (float64) holds 1e+300, beyond the "
        "range of float32 (largest finite value 3.403e+38)"
    )


def test_float64_in_range_nan_and_inf_load(gpt2_checkpoint, tmp_path):
    """Large finite values within float32, NaN and infinities load (no error, no crash)."""
    wte = gpt2_checkpoint.hf_model.transformer.wte.weight.detach().numpy().astype(np.float64)
    wte[1, :3] = [np.nan, np.inf, -np.inf]
    wte[2, 0] = 3e38
    save_with(gpt2_checkpoint, tmp_path, "transformer.wte.weight", wte)
    W_E = np.asarray(load_pretrained(tmp_path, **NO_PROCESSING).W_E)
    assert W_E.dtype == np.float32
    assert np.isnan(W_E[1, 0]) and W_E[1, 1] == np.inf and W_E[1, 2] == -np.inf
    assert W_E[2, 0] == np.float32(3e38)
    load_pretrained(tmp_path)  # processing NaN does not crash either


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_layer": "3"}, "n_layer must be a positive integer (at most 10000), got '3' (str)"),
        ({"architectures": "GPT2LMHeadModel"}, "architectures must be a list of strings"),
        ({"n_layer": 100_000_000}, "n_layer must be a positive integer (at most 10000)"),
    ],
)
def test_bad_config_json_names_the_file(gpt2_checkpoint, tmp_path, change, message):
    copy_checkpoint(gpt2_checkpoint.path, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path)
    text = str(info.value)
    assert text.startswith(f"config_from_hf: {message}")
    assert text.endswith(f" (in '{tmp_path / 'config.json'}')") and "\n" not in text


def test_a_local_folder_without_config_never_hides_a_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / EMBEDDED_MODEL).mkdir()  # e.g. a report written to --out induction-2l
    (tmp_path / EMBEDDED_MODEL / "report.json").write_text("{}")
    assert resolve_checkpoint(EMBEDDED_MODEL) == embedded_model_path()
    assert available_locally(EMBEDDED_MODEL)
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_checkpoint(f"./{EMBEDDED_MODEL}-missing")
