"""The ``python -m lowrank report`` command."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from _reference import assert_rel_close

from lowrank import circuits
from lowrank.cli import main
from lowrank.models import load_pretrained
from lowrank.report import Progress


@pytest.fixture(scope="module")
def report_run(gpt2_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    stdout, stderr = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    try:
        code = main(["report", str(gpt2_checkpoint.path), "--out", str(out), "--top-heads", "2"])
    finally:
        sys.stdout, sys.stderr = old
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_report_prints_tables_and_writes_files(report_run):
    code, stdout, stderr, out = report_run
    assert code == 0
    for heading in ("Copying scores, full OV circuit", "Top composition pairs", "W_pos effective"):
        assert heading in stdout
    assert "8/8" in stderr  # the progress bar reached its end
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["n_layers"] == 3 and len(report["heads"]) == 12
    assert len(report["svd_interpreter"]) == 2
    assert set(report["composition"]["top_pairs"]) == {"Q", "K", "V"}
    page = (out / "index.html").read_text()
    assert len(report["figures"]) >= 8
    for name in report["figures"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert f'src="{name}"' in page


def test_report_numbers_are_the_library_numbers(report_run, gpt2_checkpoint):
    _, _, _, out = report_run
    report = json.loads((out / "report.json").read_text())
    model = load_pretrained(gpt2_checkpoint.path)
    assert_rel_close(report["copying_scores"]["full_ov"], circuits.copying_scores(model))
    scores = np.asarray(circuits.composition_scores(model, "K"))
    top = report["composition"]["top_pairs"]["K"][0]
    assert top["score"] == pytest.approx(float(scores.max()), rel=1e-5)
    assert top["x_baseline"] == pytest.approx(top["score"] * np.sqrt(32), rel=1e-5)


def test_wrong_model_path_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load model") and err.count("\n") == 1


def test_bad_top_heads(tmp_path, capsys):
    assert main(["report", "--top-heads", "0", "--out", str(tmp_path)]) == 2
    assert "--top-heads must be at least 1" in capsys.readouterr().err


def test_help_documents_every_option():
    top = subprocess.run(
        [sys.executable, "-m", "lowrank", "--help"], capture_output=True, text=True, check=True
    )
    assert "report" in top.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "lowrank", "report", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("MODEL", "--out", "--top-heads", "--quiet", "report.json", "index.html"):
        assert option in sub.stdout


def test_progress_bar_without_a_terminal():
    stream = io.StringIO()
    progress = Progress(total=2, stream=stream, width=4)
    progress.step("one")
    progress.step("two")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[##..] 1/2 one") and lines[1].startswith("[####] 2/2 two")
