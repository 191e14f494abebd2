"""``python -m lowrank report --distributed`` gives the single-process report.

Two jax.distributed processes on localhost (CPU, 4 devices each, gloo collectives) analyse the
embedded model.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from _reference import assert_rel_close
from conftest import user_environment

# Three processes (two of them a jax.distributed job) each compile the whole report.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = user_environment(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _pod_timeout() -> int:
    """Seconds the pod's processes wait for each other: 600 on an idle machine, scaled by the
    load per core (capped below the test's own limit), so that a slow machine passes slowly.
    """
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return int(min(3000, 600 * max(1.0, load)))


def _report(out, *extra):
    return [sys.executable, "-m", "lowrank", "report", "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    pod = [
        subprocess.Popen(
            _report(
                root / "pod",
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--distributed-timeout",
                str(_pod_timeout()),
            ),
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    single = subprocess.run(_report(root / "single"), env=_env(1), capture_output=True, text=True)
    outputs = []
    for process in pod:
        try:
            outputs.append(process.communicate()[0])  # pytest-timeout bounds the wait
        finally:
            process.kill()
    assert single.returncode == 0, single.stderr
    for process, output in zip(pod, outputs, strict=True):
        assert process.returncode == 0, output
    load = lambda name: json.loads((root / name / "report.json").read_text())  # noqa: E731
    return load("pod"), load("single"), outputs, root


def test_only_process_0_prints_the_report(reports):
    _, _, (first, second), _ = reports
    assert "lowrank report: induction-2l" in first and "Wrote 9 figures" in first
    assert "lowrank report" not in second


@pytest.mark.parametrize("run", ["single", "pod"])
def test_report_files_on_the_embedded_model(reports, run):
    pod, single, _, root = reports
    report = {"single": single, "pod": pod}[run]
    out = root / run
    assert len(report["figures"]) == 9
    for name in [*report["figures"], "index.html"]:
        assert (out / name).stat().st_size > 1000, name
    page = (out / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in report["figures"])


def test_pod_report_equals_single_process_report(reports):
    pod, single, _, _ = reports
    assert pod["heads"] == single["heads"] and pod["config"] == single["config"]
    for key in ("full_ov", "ov"):
        assert_rel_close(pod["copying_scores"][key], single["copying_scores"][key], rtol=1e-5)
    assert_rel_close(pod["w_pos"]["singular_values"], single["w_pos"]["singular_values"], 1e-5)
    for kind in "QKV":
        got, expected = (
            pod["composition"]["top_pairs"][kind],
            single["composition"]["top_pairs"][kind],
        )
        assert [(p["left"], p["right"]) for p in got] == [(p["left"], p["right"]) for p in expected]
        assert_rel_close([p["score"] for p in got], [p["score"] for p in expected], rtol=1e-5)
    for got, expected in zip(pod["svd_interpreter"], single["svd_interpreter"], strict=True):
        assert got["head"] == expected["head"] and got["top_tokens"] == expected["top_tokens"]
        assert got["top_tokens_negated"] == expected["top_tokens_negated"]
        np.testing.assert_allclose(got["singular_value"], expected["singular_value"], rtol=1e-5)
    assert pod["figures"] == single["figures"]
