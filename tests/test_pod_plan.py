"""benchmarks/pod_plan.py: compiled (never run) pod plans from abstract inputs.

The test process has 8 CPU devices (conftest), so plans at 8 devices compile here; other
device counts go through the script's own subprocess.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from benchmarks import pod_plan
from lowrank import sharding
from lowrank.models import config_from_hf

GiB = 2**30
SLACK = 2.0  # per-device memory may be at most this multiple of the operands and output


def _live_bytes():
    return sum(x.nbytes for x in jax.live_arrays())


def test_abstract_model_allocates_nothing():
    config = config_from_hf(pod_plan.MODELS["Llama-3.1-70B"])
    mesh = sharding.make_mesh(config.n_layers, config.n_heads)
    model = sharding.abstract_model(config, mesh)
    leaves = jax.tree_util.tree_leaves(model)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(isinstance(x.sharding, NamedSharding) for x in leaves)
    assert model.params["blocks"]["attn"]["W_K"].shape == (80, 8, 8192, 128)  # grouped
    assert model.params["blocks"]["attn"]["W_Q"].sharding.spec == sharding.PER_HEAD
    bf16 = sharding.abstract_model(config, mesh, jnp.bfloat16)
    assert bf16.params["blocks"]["attn"]["W_Q"].dtype == jnp.bfloat16


def test_70b_k_composition_fits_its_bound_on_8_devices():
    """Compile Llama-3.1-70B K-composition over 8 devices; per-device memory is bounded.

    Bound: ``SLACK`` x (this device's shards of W_Q, W_O [L/8, 64, ...] and the grouped
    W_K, W_V [L/8, 8, ...], float32, plus its shard of the [L, H, L, H] output); and the
    temporaries stay below one whole W_O (nothing gathers every layer's weights).
    """
    before = _live_bytes()
    record = pod_plan.plan("Llama-3.1-70B", "composition_K", 8)
    assert _live_bytes() - before < 2**20  # nothing of the model's size was allocated
    L, H, KV, D, DH, n = 80, 64, 8, 8192, 128, 8
    weights = (2 * H + 2 * KV) * (L // n) * D * DH * 4
    output = (L * H) ** 2 * 4 // n
    memory = record["memory_per_device"]
    assert record["mesh"] == {"layers": 8, "heads": 1}
    assert memory["argument"] == weights == record["read_bytes_per_device"]
    assert memory["output"] == output
    assert memory["total"] < SLACK * (weights + output), memory["total"] / GiB
    assert memory["temp"] < L * H * DH * D * 4, memory["temp"] / GiB
    # all layer pairs, once each (padded steps included): at least the C = W_O W_K products
    pairs = L * (L - 1) // 2
    assert record["jaxpr_flops"]["matmul"] >= pairs * 2 * (H * DH) * D * (KV * DH)
    assert record["compile_s"] > 0


def test_jaxpr_flops_counts_loops_and_eig():
    def fn(x, m):
        def body(c, _):
            return c @ m, None

        y, _ = jax.lax.scan(body, x, None, length=3)
        return y, jnp.linalg.eigvals(m[:4, :4])

    closed = jax.make_jaxpr(fn)(jnp.ones((2, 5)), jnp.ones((5, 5)))
    flops = pod_plan.jaxpr_flops(closed)
    assert flops["matmul"] == 3 * 2 * 2 * 5 * 5
    assert flops["eig"] == pod_plan.EIGVALS_FLOPS_PER_N3 * 4**3


@pytest.fixture(scope="module")
def tiny_report():
    records = [pod_plan.plan("tiny-llama", a, 8) for a in pod_plan.ANALYSES]
    skipped = {"model": "tiny-llama", "analysis": "composition_K", "devices": 256}
    return pod_plan.report([*records, {**skipped, "skipped": "not compiled within 1 s"}], "v5e")


def test_report_and_writer(tiny_report, tmp_path):
    table = pod_plan.write_report(tiny_report, tmp_path, "plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "plan.md"]  # no temp
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["machine"]["jax"] == jax.__version__
    assert saved["assumptions"]["tpu"] == "TPU v5e"
    planned = [r for r in saved["records"] if "skipped" not in r]
    assert [r["analysis"] for r in planned] == list(pod_plan.ANALYSES)
    for r in planned:
        m = r["memory_per_device"]
        assert m["total"] == m["argument"] + m["output"] + m["temp"] + m["generated_code"]
        assert r["projected_s"] > 0 and r["fits_hbm"] and r["compile_s"] >= 0
        assert math.isclose(
            r["projected_s"], r["device_flops"] / (197e12 * pod_plan.FP32_FACTOR * 0.5)
        )
    copying = planned[0]["jaxpr_flops"]  # 4 x 8 eigenvalue problems of 8 x 8
    assert copying["eig"] == 4 * 8 * pod_plan.EIGVALS_FLOPS_PER_N3 * 8**3
    lines = table.splitlines()
    assert (tmp_path / "plan.md").read_text() == table
    assert lines[0].startswith("| model | analysis | devices") and len(lines[2:6]) == 4
    assert "skipped: not compiled within 1 s" in table and "TPU v5e" in table


def test_overwrite_is_atomic(tiny_report, tmp_path):
    pod_plan.write_report(tiny_report, tmp_path)
    pod_plan.write_report(tiny_report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pod_plan.json", "pod_plan.md"]


def test_cli_forces_its_device_count(tmp_path, capsys):
    """A device count other than the test process's (4) is planned in a subprocess."""
    argv = ["--models", "tiny-llama", "--analyses", "ov_eigenvalues", "--devices", "4"]
    assert pod_plan.main([*argv, "--out-dir", str(tmp_path)]) == 0
    (record,) = json.loads((tmp_path / "pod_plan.json").read_text())["records"]
    assert record["devices"] == 4 and "skipped" not in record, record
    assert np.prod(list(record["mesh"].values())) == 4
    assert "| tiny-llama | ov_eigenvalues | 4 (4x1)" in capsys.readouterr().out
