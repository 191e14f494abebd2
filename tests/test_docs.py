"""Docstrings and comments point only at files that ship with the project."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"[\w./-]*\w\.(?:py|md|ipynb)\b")


def test_referenced_files_exist_in_the_project():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    project_files = set(listed.stdout.splitlines())
    names = {Path(p).name for p in project_files}
    missing = []
    for source in sorted((ROOT / "lowrank").rglob("*.py")):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if line.lstrip().startswith(("import ", "from ")):
                continue
            for ref in REFERENCE.findall(line):
                if ref.split("/")[-1] not in names and ref not in project_files:
                    missing.append(f"{source.relative_to(ROOT)}:{number}: {ref}")
    assert not missing, "references to files outside the project:\n" + "\n".join(missing)


def test_lazy_public_api_is_complete():
    import lowrank

    assert set(lowrank.__all__) == set(lowrank._EXPORTS)
    for name in lowrank.__all__:
        assert getattr(lowrank, name) is not None, name
