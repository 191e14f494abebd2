"""The ``python -m lowrank report`` command."""

import errno
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _reference import assert_rel_close

import lowrank
from lowrank import circuits
from lowrank.cli import main
from lowrank.models import load_pretrained
from lowrank.report import progress_bar


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
    assert stderr == ""  # no progress bar when stderr is not a terminal
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
    # the embedded model has 8 heads: more is an error, not a silent clamp
    assert main(["report", "--top-heads", "9", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--top-heads 9 is more than the model's 8 heads" in err and err.count("\n") == 1


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


def test_a_lowrank_folder_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """``python -m lowrank`` from a clone's parent: ./lowrank/ (no __init__.py) is not imported."""
    (tmp_path / "lowrank").mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "lowrank", "report", "--quiet", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    meta = json.loads((tmp_path / "out" / "report.json").read_text())["meta"]
    assert meta["lowrank_version"] == lowrank.__version__


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    for stream, shown in ((io.StringIO(), False), (_Terminal(), True)):
        bar = progress_bar(2, file=stream)
        for label in ("one", "two"):
            bar.set_description_str(label)
            bar.update()
        bar.close()
        assert ("2/2" in stream.getvalue()) == shown
    quiet = _Terminal()
    progress_bar(2, enabled=False, file=quiet).close()
    assert quiet.getvalue() == ""


# ------------------------------------------------------------------ hardening
# Failure injection runs the real CLI with the analysis patched to return precomputed results
# of the same model, so each test costs seconds, not a full analysis.


def _run(argv):
    """``main(argv)`` with its stdout and stderr captured: ``(code, stdout, stderr)``."""
    stdout, stderr = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    try:
        return main(argv), stdout.getvalue(), stderr.getvalue()
    finally:
        sys.stdout, sys.stderr = old


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _staging_left(parent):
    return [p.name for p in parent.iterdir() if ".lowrank-staging-" in p.name]


@pytest.fixture(scope="module")
def results(gpt2_checkpoint):
    from lowrank.report import analyse

    return analyse(load_pretrained(gpt2_checkpoint.path), name=str(gpt2_checkpoint.path))


@pytest.fixture
def fast(monkeypatch, results):
    """Analyses replaced by the precomputed ``results``."""
    import lowrank.report

    monkeypatch.setattr(lowrank.report, "analyse", lambda *args, **kwargs: results)


@pytest.fixture
def previous(report_run, tmp_path):
    """A complete earlier report in ``tmp_path / 'out'`` and its bytes."""
    out = tmp_path / "out"
    out.mkdir()
    for path in report_run[3].iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out, _snapshot(out)


def _argv(checkpoint, out, *extra):
    return ["report", str(checkpoint.path), "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize(
    "failure", [RuntimeError("injected"), OSError(errno.ENOSPC, "No space left on device")]
)
def test_failed_json_write_leaves_the_previous_report(
    gpt2_checkpoint, previous, fast, monkeypatch, failure
):
    import lowrank.report

    out, before = previous

    def broken(report):
        raise failure

    monkeypatch.setattr(lowrank.report, "dumps", broken)
    if isinstance(failure, OSError):  # disk full: one line, exit 1, and it says so
        code, _, err = _run(_argv(gpt2_checkpoint, out))
        assert code == 1 and err.count("\n") == 1
        assert "No space left on device" in err and "previous contents" in err
    else:
        with pytest.raises(RuntimeError, match="injected"):
            main(_argv(gpt2_checkpoint, out))
    assert _snapshot(out) == before
    assert not _staging_left(out.parent)


def test_disk_full_while_drawing_leaves_the_previous_report(
    gpt2_checkpoint, previous, fast, monkeypatch
):
    from matplotlib.figure import Figure

    out, before = previous
    calls = []

    def savefig(self, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, path, **kwargs)

    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", savefig)
    code, _, err = _run(_argv(gpt2_checkpoint, out))
    assert code == 1 and "No space left on device" in err
    assert _snapshot(out) == before and not _staging_left(out.parent)


def test_new_report_replaces_stale_files(gpt2_checkpoint, previous, fast):
    out, before = previous
    (out / "old_figure.png").write_bytes(b"\x89PNG stale")
    code, _, _ = _run(_argv(gpt2_checkpoint, out))
    assert code == 0
    assert not (out / "old_figure.png").exists()
    assert sorted(_snapshot(out)) == sorted(before)


KILL_MID_FIGURES = """
import pickle, sys, time
from pathlib import Path
import lowrank.report
from matplotlib.figure import Figure
from lowrank.cli import main

results = pickle.loads(Path(sys.argv[1]).read_bytes())
lowrank.report.analyse = lambda *args, **kwargs: results
original, saved = Figure.savefig, []

def savefig(self, path, **kwargs):
    original(self, path, **kwargs)
    saved.append(path)
    if len(saved) == 2:
        Path(sys.argv[2]).write_text("mid-figures")
        time.sleep(600)

Figure.savefig = savefig
main(sys.argv[3:])
"""


def test_sigkill_mid_figures_leaves_the_previous_report(
    gpt2_checkpoint, previous, results, tmp_path
):
    out, before = previous
    pickled, marker = tmp_path / "results.pkl", tmp_path / "marker"
    pickled.write_bytes(pickle.dumps(results))
    env = {**os.environ, "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_MID_FIGURES, pickled, marker, *_argv(gpt2_checkpoint, out)],
        env=env,
    )
    try:
        while not marker.exists():  # no deadline: a loaded machine is slow, not wrong
            assert child.poll() is None, "the child ended before drawing two figures"
            time.sleep(0.05)
        staging = _staging_left(out.parent)
        assert len(staging) == 1 and any((out.parent / staging[0]).glob("*.png"))
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _snapshot(out) == before


def test_interrupted_run_leaves_the_previous_report(gpt2_checkpoint, previous, monkeypatch):
    import lowrank.report

    out, before = previous

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lowrank.report, "analyse", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(_argv(gpt2_checkpoint, out))
    assert _snapshot(out) == before and not _staging_left(out.parent)


def test_config_is_read_once(gpt2_checkpoint, tmp_path, monkeypatch):
    """The command reads config.json once (to check --top-heads) and hands it to the loader."""
    import lowrank.models.loading
    import lowrank.report

    reads = []
    read = lowrank.models.loading.config_from_hf

    def counted(path):
        reads.append(path)
        return read(path)

    def loaded(*args, **kwargs):
        raise KeyboardInterrupt  # the model is loaded: the analyses are not needed

    monkeypatch.setattr(lowrank.models.loading, "config_from_hf", counted)
    monkeypatch.setattr(lowrank.report, "analyse", loaded)
    with pytest.raises(KeyboardInterrupt):
        main(_argv(gpt2_checkpoint, tmp_path / "out"))
    assert len(reads) == 1, reads


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    import lowrank.models

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(lowrank.models, "load_pretrained", forbidden)
    monkeypatch.setattr(lowrank.models, "resolve_checkpoint", forbidden)


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "is a file"),
        (lambda tmp: tmp / "missing" / "out", "does not exist"),
        (lambda tmp: Path("/proc/lowrank-report"), "--out"),
        (
            lambda tmp: (
                (tmp / "mine").mkdir()
                or (tmp / "mine" / "notes.txt").write_text("x")
                and tmp / "mine"
            ),
            "not an earlier report",
        ),
        (lambda tmp: (tmp / "link").symlink_to(tmp) or tmp / "link", "symbolic link"),
    ],
    ids=["file", "missing-parent", "unwritable", "other-files", "symlink"],
)
def test_bad_output_folder_is_one_line_before_loading(tmp_path, no_loading, make_out, message):
    out = make_out(tmp_path)
    code, _, err = _run(["report", "--out", str(out)])
    assert code == 2, err
    assert err.startswith("error: --out") and err.count("\n") == 1 and message in err
    assert not _staging_left(tmp_path)


def _copy_checkpoint(source, target):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_strict_json_and_nonfinite_weights(gpt2_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = _copy_checkpoint(gpt2_checkpoint.path, tmp_path / "nan")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["transformer.h.1.attn.c_proj.weight"][0, 0] = np.nan
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = _run(["report", str(ckpt), "--out", str(out), "--quiet"])
    assert code == 2 and err.count("\n") == 1
    assert "NaN or Inf" in err and "blocks.attn.W_O" in err and "--allow-nonfinite" in err
    assert not out.exists()

    code, _, err = _run(["report", str(ckpt), "--out", str(out), "--quiet", "--allow-nonfinite"])
    assert code == 0 and err.startswith("warning:")

    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    report = json.loads((out / "report.json").read_text(), parse_constant=reject)
    assert None in report["copying_scores"]["full_ov"][1]  # NaN became null


def _bad_config(gpt2_checkpoint, tmp_path, **changes):
    ckpt = _copy_checkpoint(gpt2_checkpoint.path, tmp_path / "bad")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.mark.parametrize(
    "changes",
    [
        {"n_layer": "3"},
        {"n_embd": 32.5},
        {"architectures": "GPT2LMHeadModel"},
        {"architectures": {"a": 1}},
        {"n_layer": 100_000_000},
        {"layer_norm_epsilon": "small"},
    ],
    ids=str,
)
def test_bad_config_is_one_line_exit_2(gpt2_checkpoint, tmp_path, changes):
    ckpt = _bad_config(gpt2_checkpoint, tmp_path, **changes)
    start = time.perf_counter()
    code, _, err = _run(["report", str(ckpt), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and err.startswith("error: cannot load model") and err.count("\n") == 1
    assert time.perf_counter() - start < 60  # fails fast, never builds 1e8 layers
    assert not (tmp_path / "out").exists() and not _staging_left(tmp_path)


def test_deeply_nested_config_is_one_line_exit_2(gpt2_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(gpt2_checkpoint.path, tmp_path / "deep")
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = _run(["report", str(ckpt), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and err.startswith("error: cannot load model") and err.count("\n") == 1


def test_pickle_checkpoint_names_the_cli_option(gpt2_checkpoint, tmp_path, fast):
    import torch

    ckpt = _copy_checkpoint(gpt2_checkpoint.path, tmp_path / "pickled")
    (ckpt / "model.safetensors").unlink()
    torch.save(gpt2_checkpoint.hf_model.state_dict(), ckpt / "pytorch_model.bin")
    out = tmp_path / "out"
    code, _, err = _run(["report", str(ckpt), "--out", str(out), "--quiet"])
    assert code == 2 and "--allow-pickle" in err and err.count("\n") == 1
    code, _, err = _run(["report", str(ckpt), "--out", str(out), "--quiet", "--allow-pickle"])
    assert code == 0, err
    assert (out / "report.json").exists()


def test_out_folder_never_shadows_the_model_name(tmp_path, monkeypatch, fast):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run finds ./induction-2l, the first run's report
        code, _, err = _run(["report", "induction-2l", "--out", "induction-2l", "--quiet"])
        assert code == 0, err
    assert (tmp_path / "induction-2l" / "report.json").exists()


def test_model_and_out_the_same_folder(gpt2_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(gpt2_checkpoint.path, tmp_path / "ckpt")
    code, _, err = _run(["report", str(ckpt), "--out", str(ckpt), "--quiet"])
    assert code == 2 and err.count("\n") == 1
    assert (ckpt / "config.json").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--num-processes", "2"], "--num-processes need --distributed"),
        (["--distributed", "--num-processes", "0"], "--num-processes must be at least 1"),
        (["--distributed", "--num-processes", "2", "--process-id", "2"], "--process-id must be"),
        (["--distributed", "--coordinator", "nohost"], "--coordinator must be HOST:PORT"),
        (["--distributed-timeout", "600"], "--distributed-timeout need --distributed"),
        (["--distributed", "--distributed-timeout", "0"], "--distributed-timeout must be at"),
    ],
)
def test_bad_pod_options_are_one_line_before_loading(tmp_path, no_loading, options, message):
    code, _, err = _run(["report", "--out", str(tmp_path / "out"), *options])
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not _staging_left(tmp_path)


def test_distributed_without_a_cluster_is_one_line(tmp_path):
    # No coordinator given and none to detect (not a TPU pod, not SLURM): jax refuses at once.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "OMPI", "TPU"))}
    result = subprocess.run(
        [sys.executable, "-m", "lowrank", "report", "--distributed", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**env, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: cannot join the distributed job")
    assert result.stderr.count("\n") == 1


HELP_IMPORTS = """
import runpy, sys
sys.argv = ["lowrank", *sys.argv[1:]]
try:
    runpy.run_module("lowrank", run_name="__main__")
except SystemExit:
    pass
heavy = ("jax", "flax", "numpy", "transformers", "matplotlib", "torch")
print(sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
"""


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"]])
def test_help_imports_nothing_heavy(argv):
    """``--help`` answers at once: jax, transformers and matplotlib load only for real work."""
    out = subprocess.run(
        [sys.executable, "-c", HELP_IMPORTS, *argv], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_cli_default_is_the_embedded_model():
    from lowrank import cli
    from lowrank.models import EMBEDDED_MODEL

    assert cli.EMBEDDED_MODEL == EMBEDDED_MODEL
