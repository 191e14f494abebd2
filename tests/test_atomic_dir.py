"""Folders written all at once: complete new contents or the old ones, never a mix."""

import multiprocessing
import os
import subprocess
import sys

import pytest

from lowrank import atomic_dir
from lowrank.atomic_dir import OutputDirError, check_target, staged

KINDS = {"names": frozenset({"report.json"}), "suffixes": frozenset({".png"})}


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _write(folder, tag, names=("a.png", "b.png", "report.json")):
    for name in names:
        (folder / name).write_text(f"{tag}:{name}")


def _no_staging_left(parent):
    return not [p for p in parent.iterdir() if ".lowrank-staging-" in p.name]


@pytest.fixture
def previous(tmp_path):
    out = tmp_path / "out"
    with staged(out, **KINDS) as folder:
        _write(folder, "old", ("a.png", "stale.png", "report.json"))
    return out, _snapshot(out)


def test_new_folder_appears_complete(tmp_path):
    out = tmp_path / "out"
    with staged(out, **KINDS) as folder:
        _write(folder, "new")
        assert not out.exists()  # nothing at the target until the block ends
    assert _snapshot(out) == {n: f"new:{n}".encode() for n in ("a.png", "b.png", "report.json")}
    assert _no_staging_left(tmp_path)


def test_replacing_drops_stale_files(previous):
    out, _ = previous
    with staged(out, **KINDS) as folder:
        _write(folder, "new")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "report.json"]
    assert (out / "a.png").read_text() == "new:a.png"


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_failure_leaves_the_previous_folder(previous, monkeypatch, atomic_exchange):
    out, before = previous
    if not atomic_exchange:
        monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
    with pytest.raises(RuntimeError), staged(out, **KINDS) as folder:
        _write(folder, "new", ("a.png",))
        raise RuntimeError("injected")
    assert _snapshot(out) == before
    assert _no_staging_left(out.parent)
    with staged(out, **KINDS) as folder:  # and a later success replaces it, both ways
        _write(folder, "new")
    assert (out / "a.png").read_text() == "new:a.png" and not (out / "stale.png").exists()
    assert _no_staging_left(out.parent)


def test_interrupt_leaves_the_previous_folder(previous):
    out, before = previous
    with pytest.raises(KeyboardInterrupt), staged(out, **KINDS) as folder:
        _write(folder, "new")
        raise KeyboardInterrupt
    assert _snapshot(out) == before


def test_killed_run_leaves_the_previous_folder_and_is_cleaned_up_later(previous):
    out, before = previous
    script = (
        "import os, sys, time\n"
        "from lowrank.atomic_dir import staged\n"
        "kinds = dict(names=frozenset({'report.json'}), suffixes=frozenset({'.png'}))\n"
        "with staged(sys.argv[1], **kinds) as folder:\n"
        "    (folder / 'a.png').write_text('half')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(out)], check=False)
    assert result.returncode == -9
    assert _snapshot(out) == before
    assert not _no_staging_left(out.parent)  # the killed run's folder is still there ...
    with staged(out, **KINDS) as folder:
        _write(folder, "new")
    assert _no_staging_left(out.parent)  # ... until the next run removes it


def _publish_many(target, tag):
    for _ in range(20):
        with staged(target, **KINDS) as folder:
            _write(folder, tag, [f"{i}.png" for i in range(10)] + ["report.json"])


def test_concurrent_runs_never_mix(tmp_path):
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("spawn")
    runs = [ctx.Process(target=_publish_many, args=(out, tag)) for tag in ("x", "y", "z")]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert [run.exitcode for run in runs] == [0, 0, 0]
    tags = {p.read_text().split(":")[0] for p in out.iterdir()}
    assert len(tags) == 1 and len(list(out.iterdir())) == 11
    assert _no_staging_left(tmp_path)


def test_target_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        check_target(tmp_path / "file", **KINDS)
    with pytest.raises(OutputDirError, match="parent folder .* does not exist"):
        check_target(tmp_path / "missing" / "out", **KINDS)
    with pytest.raises(OutputDirError, match="parent folder .* does not exist"):
        check_target(tmp_path / "file" / "out", **KINDS)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputDirError, match="symbolic link"):
        check_target(tmp_path / "link", **KINDS)
    assert check_target(tmp_path / "real", **KINDS) == tmp_path / "real"  # empty: replaceable


@pytest.mark.parametrize("entry", ["notes.txt", "sub/", "evil.png->"])
def test_a_folder_of_other_files_is_never_replaced(tmp_path, entry):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    if entry.endswith("/"):
        (out / entry[:-1]).mkdir()
    elif entry.endswith("->"):
        (out / entry[:-2]).symlink_to(tmp_path / "elsewhere")
    else:
        (out / entry).write_text("keep me")
    before = sorted(os.listdir(out))
    with pytest.raises(OutputDirError, match="not an earlier report"), staged(out, **KINDS):
        pass
    assert sorted(os.listdir(out)) == before


def test_unwritable_parent_fails_before_any_work():
    entered = []
    with pytest.raises(OSError), staged("/proc/lowrank-report", **KINDS):
        entered.append(True)
    assert not entered
