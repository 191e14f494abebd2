"""The embedded model ``induction-2l-rope``: an attention-only Llama with an induction circuit.

RMSNorm, RoPE and grouped-query attention (4 query heads, 2 key/value heads); the rotary
analyses find its previous-token head by relative offset, and the copying and composition
scores find the induction heads that read it.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import user_environment

from lowrank.circuits import (
    composition_baseline,
    composition_scores,
    copying_scores,
    relative_position_profile,
)
from lowrank.data import train_embedded as te
from lowrank.models import embedded_model_path, load_pretrained, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
NAME = "induction-2l-rope"
OFFSETS = np.asarray(te.PROFILE_OFFSETS)  # 0..16: query minus key position


@pytest.fixture(scope="module")
def path():
    return embedded_model_path(NAME)


@pytest.fixture(scope="module")
def metrics(path):
    return json.loads((path / "metrics.json").read_text())


@pytest.fixture(scope="module")
def train_config(metrics):
    return te.train_config_from_dict(metrics["train"])


@pytest.fixture(scope="module")
def model():
    return load_pretrained(NAME)


@pytest.fixture(scope="module")
def held_out(metrics, train_config):
    return te.held_out_batch(train_config, metrics["seed"])


@pytest.fixture(scope="module")
def scores(model, held_out):
    return te.evaluate(model, held_out)


@pytest.fixture(scope="module")
def heads(scores):
    """(previous-token head in layer 0, induction head in layer 1), from attention patterns."""
    return int(np.argmax(scores["prev_token_score"])), int(np.argmax(scores["induction_score"]))


def test_files_and_config(path, model, train_config):
    names = {p.name for p in path.iterdir()}
    want = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert want | {"special_tokens_map.json", "metrics.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in path.iterdir()) < 4_000_000
    assert path.parent.name == "data" and path.name == NAME
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (path / name).read_bytes() == (embedded_model_path() / name).read_bytes(), name
    c = model.config
    assert c.architecture == "LlamaForCausalLM" and train_config.arch == "llama"
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.d_vocab, c.n_ctx) == (2, 4, 2, len(te.VOCAB), 48)
    assert (c.normalization, c.positional, c.rotary_dim) == ("RMS", "rotary", c.d_head)
    assert not (c.attn_qkv_bias or c.attn_out_bias or c.tie_word_embeddings)
    assert c == te.model_config(train_config)


def test_resolves_by_name_offline(monkeypatch, path):
    from lowrank.models import EMBEDDED_MODEL, EMBEDDED_MODELS, available_locally, hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_download", lambda *a, **k: pytest.fail("hub was used"))
    assert EMBEDDED_MODELS == (EMBEDDED_MODEL, NAME)
    assert resolve_checkpoint(NAME) == path and available_locally(NAME)
    with pytest.raises(ValueError, match="embedded models"):
        embedded_model_path("induction-3l")


def test_cli_knows_the_names():
    from lowrank import cli
    from lowrank.models import EMBEDDED_MODELS

    assert cli.EMBEDDED_MODELS == EMBEDDED_MODELS


def test_attention_only(path):
    """The MLP Hugging Face's Llama requires is width 1 with zero weights: it adds exactly 0."""
    raw = load_pretrained(path, fold_ln=False, center_writing_weights=False, center_unembed=False)
    mlp = {name: np.asarray(leaf) for name, leaf in raw.params["blocks"]["mlp"].items()}
    assert raw.config.d_mlp == 1 and mlp["W_out"].shape == (2, 1, raw.config.d_model)
    assert not any(leaf.any() for leaf in mlp.values())
    tokens = te.copy_task_batch(np.random.default_rng(5), 4)["tokens"]
    _, acts = raw.forward(tokens, return_activations=True)
    np.testing.assert_array_equal(np.asarray(acts["resid_mid"]), np.asarray(acts["resid_post"]))


def test_hf_torch_gives_the_same_logits(model, held_out, path):
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager")
    tokens = held_out["tokens"][:8]
    with torch.no_grad():
        ref = hf.eval()(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(jax.nn.log_softmax(model(tokens), axis=-1))
    ref = np.asarray(jax.nn.log_softmax(ref, axis=-1))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


def test_solves_the_task(scores, metrics):
    """Held-out accuracy on the scored (copied) tokens, with lowrank's forward pass."""
    assert scores["accuracy"] > 0.95
    assert scores["accuracy"] == pytest.approx(metrics["held_out"]["accuracy"], abs=1e-4)
    assert scores["scored_tokens"] == metrics["held_out"]["scored_tokens"] > 5000


def test_solves_a_readable_example(model):
    text = "sun moon star tree king bird red boat sea cake egg sun moon star tree king bird"
    pred = np.asarray(model(model.to_tokens(text))).argmax(-1)[0]
    words = text.split()
    assert [te.VOCAB[i] for i in pred[12:17]] == words[12:17]


def test_previous_token_head_peaks_at_offset_one(model, scores, heads):
    """From the weights alone: the rotary profile of the previous-token head peaks at 1."""
    h0, _ = heads
    prev = scores["prev_token_score"]
    assert prev[h0] > 0.6 and np.sort(prev)[-2] < 0.2  # the one previous-token head
    profile = np.asarray(jax.jit(relative_position_profile)(model, OFFSETS))
    assert profile.shape == (2, 4, len(OFFSETS))
    assert OFFSETS[np.argmax(profile[0, h0])] == 1


def test_induction_heads_copy(model, scores):
    induction = np.asarray(scores["induction_score"])
    assert np.all(induction > 0.5)  # every layer-1 head attends to the token after the copy
    copying = np.asarray(jax.jit(copying_scores)(model))
    assert copying.shape == (2, 4)
    assert np.all(copying[1] > 0.7)


def test_k_composition_above_three_times_baseline(model, heads, metrics):
    h0, h1 = heads
    k_comp = np.asarray(jax.jit(composition_scores, static_argnums=1)(model, "K"))
    baseline = composition_baseline(model.config.d_model)
    assert np.all(k_comp[0, h0, 1] > 3 * baseline)  # every induction head reads head h0
    assert np.all(np.argmax(k_comp[0, :, 1], axis=0) == h0)
    # Query heads 2g and 2g + 1 share key/value head g, so their K-composition is close.
    assert k_comp[0, h0, 1, h1] == pytest.approx(metrics["k_composition"], abs=1e-4)


def test_metrics_json_matches_model(model, metrics, scores, heads, path):
    h0, h1 = heads
    assert metrics["prev_token_head"] == [0, h0] and metrics["induction_head"] == [1, h1]
    copying = np.asarray(jax.jit(copying_scores)(model))
    np.testing.assert_allclose(copying, metrics["copying_scores"], atol=2e-4)
    np.testing.assert_allclose(
        scores["prev_token_score"], metrics["prev_token_scores_layer0"], atol=2e-4
    )
    profile = np.asarray(relative_position_profile(model, OFFSETS))[0, h0]
    np.testing.assert_allclose(profile, metrics["relative_position_profile"], rtol=1e-3, atol=0.02)
    assert te.metrics_table(metrics) in (path / "README.md").read_text()


# Reproducibility, as for induction-2l (tests/test_embedded_model.py): bit-identical on one
# machine; on another CPU the weights drift slightly, so the tolerances ask for the same heads
# and the same circuit rather than the same numbers.
@pytest.mark.slow
@pytest.mark.timeout(3600)  # 227 s on 2 cores at load average 4-5 (as induction-2l's test)
def test_retraining_reproduces_metrics(tmp_path, metrics):
    out = tmp_path / NAME
    command = metrics["command"].replace("DIR", str(out)).split()
    assert command[:5] == ["python", "-m", "lowrank.data.train_embedded", "--model", NAME]
    env = user_environment(PYTHONPATH=str(REPO))  # compiled and run as users do
    subprocess.run([sys.executable, *command[1:], "--quiet"], check=True, cwd=tmp_path, env=env)
    new = json.loads((out / "metrics.json").read_text())
    for key in ("seed", "train", "prev_token_head", "command"):
        assert new[key] == metrics[key], key
    assert new["held_out"]["accuracy"] == pytest.approx(metrics["held_out"]["accuracy"], abs=0.01)
    assert new["held_out"]["accuracy"] > 0.95
    h0 = metrics["prev_token_head"][1]
    new_prev = new["prev_token_scores_layer0"][h0]
    assert new_prev == pytest.approx(metrics["prev_token_scores_layer0"][h0], abs=0.05)
    assert OFFSETS[np.argmax(new["relative_position_profile"])] == 1
    induction = np.asarray(new["induction_scores_layer1"])
    np.testing.assert_allclose(induction, metrics["induction_scores_layer1"], atol=0.05)
    assert induction.min() > 0.5
    np.testing.assert_allclose(new["copying_scores"][1], metrics["copying_scores"][1], atol=0.05)
    assert min(new["copying_scores"][1]) > 0.7
    k_from_prev = np.asarray(new["k_composition_layer0_to_layer1"][h0])
    expected = np.asarray(metrics["k_composition_layer0_to_layer1"][h0])
    np.testing.assert_allclose(k_from_prev, expected, atol=0.03)
    assert k_from_prev.min() > 3 * new["composition_baseline"]
    assert new["ov_top_direction"]["copies_top_tokens"] == [1.0, 1.0]
    np.testing.assert_allclose(
        new["train_loss_curve"][:5], metrics["train_loss_curve"][:5], rtol=1e-3
    )
