"""The benchmark runner (``python -m benchmarks.run``) on the smallest model and on a small
random Llama checkpoint (``--checkpoint``): schema, agreement, bad input.

No timing thresholds: only that every op ran on both sides, took a positive time and that
lowrank and TransformerLens agree.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import run
from benchmarks.helpers import stack_layers, tl_major_version, unstack_layers
from benchmarks.mirror import Unmirrorable, tl_config
from benchmarks.ops import (
    OPS,
    OPS_BY_NAME,
    TorchSide,
    eig_error,
    logprob_error,
    rel_error,
    svd_error,
)
from benchmarks.shapes import Unavailable, build_weights, checkpoint_weights, embedded_weights
from benchmarks.tl_reference import hf_model, reference_model, with_unit_norms
from lowrank.models import forward, read_config

# lowrank and TL compute the same float32 quantities by different algorithms (Cholesky QR vs
# SVDs of the factors, other summation orders); their results differ by ~1e-7 to 1e-5 relative
# (eigenvalues of non-normal 64 x 64 cores being the worst conditioned). 1e-3 leaves a 100x
# margin for that, while a real bug (a missing transpose, a wrong association or layer mask,
# a stale cache) changes results by O(1).
TOLERANCE = 1e-3


def _smallest_shape() -> str:
    try:
        embedded_weights()
    except Unavailable:
        return "tiny"
    return "embedded"


def _run(out, *argv: str) -> dict:
    """``run.main(argv)`` writing ``out/test.json``; its report (torch's threads restored)."""
    import torch

    threads = torch.get_num_threads()
    try:
        assert run.main([*argv, "--repeats", "1", "--out-dir", str(out), "--machine", "test"]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "test.json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    _run(out, "--shapes", _smallest_shape(), "--seq", "32")
    return out


@pytest.fixture(scope="module")
def llama(rotary_checkpoint, tmp_path_factory):
    """The checkpoint of a random Llama (4 query heads sharing 2 key/value heads, llama3
    rotary scaling, RMSNorm, SwiGLU) and the report of every op on it.
    """
    ckpt = rotary_checkpoint("llama")
    out = tmp_path_factory.mktemp("bench_llama")
    return ckpt, _run(out, "--checkpoint", str(ckpt.path), "--seq", "16")


def _assert_all_agree(report: dict) -> None:
    """Every op ran on both sides, took a positive time, and lowrank and TL agree."""
    records = {r["op"]: r for r in report["results"]}
    assert sorted(records) == sorted(op.name for op in OPS)
    for name, r in records.items():
        lr, tl = r["lowrank"], r["reference"]
        assert "error" not in lr and "error" not in tl and "skipped" not in tl, (name, r)
        assert lr["median_s"] > 0 and lr["min_s"] > 0 and lr["compile_s"] > 0, name
        assert tl["median_s"] > 0 and tl["min_s"] > 0, name
        assert len(lr["times_s"]) == len(tl["times_s"]) == 1
        assert lr["xla_memory"] is None or lr["xla_memory"]["total"] > 0
        assert r["speedup"] == pytest.approx(tl["median_s"] / lr["median_s"])
        assert 0 <= r["max_rel_error"] <= TOLERANCE and r["agree"] is True, (name, r)


def test_json_schema_and_agreement(results):
    report = json.loads((results / "test.json").read_text())
    assert report["schema"] == run.SCHEMA
    machine = report["machine"]
    for key in ("platform", "device_kind", "cpu_count", "jax", "jaxlib", "torch", "date"):
        assert machine[key], key
    assert machine["transformer_lens"] and machine["torch_threads"] >= 1
    kind = "HookedTransformer" if tl_major_version() < 4 else "TransformerBridge"
    assert machine["transformer_lens_forward"].startswith(kind)
    assert report["settings"]["repeats"] == 1
    assert report["settings"]["tolerance"] == TOLERANCE
    _assert_all_agree(report)


def _keys(report: dict) -> tuple:
    """The key sets of a report's parts: top level, settings, shape entries, record parts."""
    records = report["results"]
    return (
        set(report),
        set(report["settings"]),
        {frozenset(info) for info in report["shapes"].values()},
        {frozenset(r) for r in records},
        {frozenset(r["lowrank"]) for r in records},
        {frozenset(r["reference"]) for r in records},
    )


def test_checkpoint_agrees_with_transformer_lens(llama, results):
    """A grouped-query rotary checkpoint: every op agrees, the report has the usual schema."""
    ckpt, report = llama
    label = f"{ckpt.path.name} (LlamaForCausalLM)"
    assert list(report["shapes"]) == [label]  # --checkpoint alone runs no named shape
    shape = report["shapes"][label]
    assert (shape["n_layers"], shape["n_heads"], shape["n_kv_heads"]) == (3, 4, 2)
    assert shape["architecture"] == "LlamaForCausalLM" and str(ckpt.path) in shape["weights"]
    assert {r["shape"] for r in report["results"]} == {label}
    _assert_all_agree(report)
    assert _keys(report) == _keys(json.loads((results / "test.json").read_text()))


def test_checkpoint_markdown_names_it(llama):
    ckpt, report = llama
    rows = [line for line in run.markdown(report).splitlines() if ckpt.path.name in line]
    assert len(rows) == len(OPS) and all("ok (" in row for row in rows)


@pytest.fixture(scope="module")
def mistral_linear(rotary_checkpoint):
    """A Mistral checkpoint (every layer slides) with linear rotary scaling, which TL 3's
    ``HookedTransformer`` applies to global layers only: it cannot mirror its forward pass.
    """
    return rotary_checkpoint("mistral", rope_scaling=dict(rope_type="linear", factor=2.0))


@pytest.fixture(scope="module")
def folded_gpt2(gpt2_checkpoint):
    """A processed GPT-2 tree that does not name its checkpoint. Its final LayerNorm's bias is
    folded into a non-zero ``b_U``, which a Hugging Face GPT-2 has no place for: TL 4, which
    runs Hugging Face models, cannot run it.
    """
    return dataclasses.replace(checkpoint_weights(gpt2_checkpoint.path), checkpoint=None)


@pytest.fixture(scope="module")
def unmirrorable(mistral_linear, folded_gpt2):
    """Weights the installed TL cannot run as lowrank does, and a phrase of the reason."""
    if tl_major_version() < 4:
        return checkpoint_weights(mistral_linear.path), "linear rotary scaling"
    return folded_gpt2, "unembed.b_U is non-zero"


def test_unmirrorable_op_is_noted(unmirrorable):
    """The forward record says why TL was not run; the weight-only ops still agree."""
    import torch

    weights, why = unmirrorable
    runner = run.Runner(repeats=1, reference_timeout=120.0, torch_device="cpu")
    tokens = np.arange(8, dtype=np.int32)[None] % weights.config.d_vocab
    side = TorchSide(weights, "cpu", torch.from_numpy(tokens).long())
    model, jax_tokens = weights.lowrank_model(), jax.device_put(tokens)
    records = {
        name: runner.run_op(OPS_BY_NAME[name], weights.name, model, jax_tokens, side)
        for name in ("ov_norm", "forward")
    }
    forward = records["forward"]
    assert forward["reference"] == {"skipped": "TransformerLens cannot mirror the model"}
    assert "max_rel_error" not in forward and forward["lowrank"]["median_s"] > 0
    assert any(why in note for note in forward["notes"]), forward
    assert "skipped" in run.summary_line(forward)
    assert records["ov_norm"]["agree"] is True


def test_linear_rotary_scaling(mistral_linear, tmp_path):
    """TL 3 cannot mirror linear scaling on sliding layers (the record says so); TL 4 runs
    Hugging Face's Mistral, which scales every layer as lowrank does, and agrees.
    """
    report = _run(tmp_path, "--checkpoint", str(mistral_linear.path), "--ops", "ov_norm,forward")
    records = {r["op"]: r for r in report["results"]}
    forward = records["forward"]
    assert forward["lowrank"]["median_s"] > 0 and records["ov_norm"]["agree"] is True
    if tl_major_version() < 4:
        assert forward["reference"] == {"skipped": "TransformerLens cannot mirror the model"}
        assert any("linear rotary scaling" in note for note in forward["notes"]), forward
    else:
        assert forward["agree"] is True and forward["max_rel_error"] <= TOLERANCE, forward


def test_tl_config_refuses_what_it_cannot_mirror(mistral_linear, folded_gpt2):
    """TL 3: the mirrored config refuses linear scaling with local layers and mirrors the rest.
    TL 4: the bridge refuses a tree with no Hugging Face model.
    """
    if tl_major_version() >= 4:
        with pytest.raises(Unmirrorable, match="cannot write this GPT2LMHeadModel tree as one"):
            reference_model(folded_gpt2, "cpu")
        return
    config = read_config(mistral_linear.path)
    with pytest.raises(Unmirrorable, match="cannot mirror this MistralForCausalLM model: it "):
        tl_config(config, ln_folded=True, device="cpu")
    cfg = tl_config(dataclasses.replace(config, attn_types=None), ln_folded=True, device="cpu")
    assert cfg.rotary_scaling_factor == 2.0 and cfg.n_key_value_heads == 2
    assert cfg.normalization_type == "RMSPre" and cfg.positional_embedding_type == "rotary"


def test_hf_model_of_a_folded_tree(llama):
    """A folded tree with unit norms is the same model: lowrank's forward pass is unchanged,
    and the Hugging Face model lowrank writes of it (what TL 4 runs) agrees with lowrank.
    """
    import torch

    ckpt, _ = llama
    weights = dataclasses.replace(checkpoint_weights(ckpt.path), checkpoint=None)
    assert "ln1" not in weights.params["blocks"]
    unfolded = with_unit_norms(weights.params, weights.config)
    np.testing.assert_array_equal(unfolded["blocks"]["ln1"]["w"], 1.0)
    tokens = np.arange(12, dtype=np.int32)[None] % weights.config.d_vocab
    ours = np.asarray(forward(weights.params, tokens, weights.config))
    np.testing.assert_allclose(forward(unfolded, tokens, weights.config), ours, atol=1e-5)
    with torch.no_grad():
        logits = hf_model(weights)(torch.from_numpy(tokens).long()).logits
    assert logprob_error(ours, logits.numpy()) <= TOLERANCE


def _bad_checkpoint(kind: str, directory: Path) -> Path:
    """A ``--checkpoint`` argument of the given kind of bad input, made in ``directory``."""
    if kind == "file":
        (directory / "file").write_text("{}")
        return directory / "file"
    if kind == "bert":
        (directory / "config.json").write_text('{"architectures": ["BertModel"]}')
    return directory / "missing" if kind == "missing" else directory


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("file", "is not a directory"),
        ("missing", "is not a directory"),
        ("no-config", "a checkpoint needs its config.json"),
        ("bert", "unsupported architecture 'BertModel'"),
    ],
)
def test_bad_checkpoint_is_refused(tmp_path, capsys, kind, message):
    path = _bad_checkpoint(kind, tmp_path)
    with pytest.raises(SystemExit) as exc:
        run.main(["--checkpoint", str(path), "--out-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--checkpoint: " in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_markdown_table(results):
    text = (results / "test.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| shape | op | lowrank ms | TL ms | speed-up")
    assert len(rows) == 1 + len(OPS)
    assert all("ok (" in row for row in rows[1:])
    (results / "test.md").unlink()
    assert run.main(["--markdown-only", str(results / "test.json")]) == 0
    assert (results / "test.md").read_text() == text


def test_comparisons_catch_wrong_results():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 8)) + 1j * rng.standard_normal((3, 8))
    w = np.concatenate([w, w.conj()], axis=-1)  # conjugate pairs, as for real matrices
    assert eig_error(w[..., ::-1], w) == 0  # order does not matter
    assert eig_error(w * 1.01, w) > TOLERANCE
    assert eig_error(w.conj() * 1j, w) > TOLERANCE  # same moduli, other real parts
    M = rng.standard_normal((2, 6, 4)) @ rng.standard_normal((2, 4, 5))
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    V = np.swapaxes(Vh, -1, -2)
    flip = np.array([1, -1, 1, -1, 1])
    assert svd_error((U * flip, S, Vh * flip[:, None]), (U, S, V)) < 1e-6  # sign choice
    assert svd_error((U[..., ::-1], S, Vh), (U, S, V)) > TOLERANCE  # mis-paired vectors
    assert rel_error(S, S) == 0 and rel_error(S * 1.01, S) > TOLERANCE
    logits = rng.standard_normal((2, 5, 7))
    assert logprob_error(logits + 3.0, logits) < 1e-12  # a shift per position is no change
    assert logprob_error(logits * 1.01, logits) > TOLERANCE


def test_layer_layouts_round_trip():
    """TL's per-layer state dict and lowrank's stacked tree hold the same arrays."""
    weights = build_weights("tiny")
    flat = weights.flat()
    per_layer = unstack_layers(flat, weights.config.n_layers)
    assert "blocks.attn.W_Q" not in per_layer
    np.testing.assert_array_equal(per_layer["blocks.1.attn.W_Q"], flat["blocks.attn.W_Q"][1])
    np.testing.assert_array_equal(per_layer["embed.W_E"], flat["embed.W_E"])
    stacked = stack_layers(per_layer, weights.config.n_layers)
    assert list(stacked) == list(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(stacked[key], value, err_msg=key)
