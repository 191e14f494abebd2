"""The README's Python examples run (on the embedded model, offline)."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = {
    section.splitlines()[0].strip(): re.findall(r"```python\n(.*?)```", section, re.S)
    for section in README.split("\n## ")[1:]
}
NEEDS_THE_HUB = ("gpt2", "EleutherAI/")


def _runnable(code: str) -> str:
    """The block without the lines that load a model from the hub."""
    return "\n".join(
        line for line in code.splitlines() if not any(f'"{n}' in line for n in NEEDS_THE_HUB)
    )


@pytest.fixture(scope="module")
def namespace():
    import jax.numpy as jnp

    import lowrank

    return {"lowrank": lowrank, "jnp": jnp, "model": lowrank.load_pretrained()}


@pytest.mark.parametrize(
    "section", ["Example", "Models", "Circuits and the report", "Sharded and multi-host runs"]
)
def test_examples_run(section, namespace):
    (code,) = BLOCKS[section]
    compile(code, f"README {section}", "exec")  # every line is valid Python, hub lines too
    exec(_runnable(code), dict(namespace))


def test_ci_runs_the_readme_commands():
    """``.ci/run`` runs the README's two commands.

    Each install exactly, the main job, and exactly the test command.
    """
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    main_job, tests = ([p.strip() for p in line.split("#")[0].split("&&")] for line in commands)
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
    ci_lines = [line.strip() for line in ci]
    assert main_job[0] == "pip install -e ." and main_job[0] in ci_lines
    assert any(line.startswith(main_job[1]) for line in ci_lines)  # with a scratch --out
    assert all(part in ci_lines for part in tests)
    assert ci_lines.index(main_job[0]) < ci_lines.index(tests[0])
