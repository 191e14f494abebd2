"""The benchmark runner (``python -m benchmarks.run``) on the smallest model: schema, agreement.

No timing thresholds: only that every op ran on both sides, took a positive time and that
lowrank and TransformerLens agree.
"""

import json

import numpy as np
import pytest

from benchmarks import run
from benchmarks.ops import OPS, eig_error, rel_error, svd_error
from benchmarks.shapes import Unavailable, embedded_weights

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


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    argv = ["--shapes", _smallest_shape(), "--repeats", "1", "--seq", "32"]
    try:
        assert run.main([*argv, "--out-dir", str(out), "--machine", "test"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_json_schema_and_agreement(results):
    report = json.loads((results / "test.json").read_text())
    assert report["schema"] == run.SCHEMA
    machine = report["machine"]
    for key in ("platform", "device_kind", "cpu_count", "jax", "jaxlib", "torch", "date"):
        assert machine[key], key
    assert machine["transformer_lens"] and machine["torch_threads"] >= 1
    assert report["settings"]["repeats"] == 1
    assert report["settings"]["tolerance"] == TOLERANCE
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
