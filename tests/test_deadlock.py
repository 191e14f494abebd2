"""The jaxlib CPU LAPACK deadlock workaround is on exactly for the jaxlib versions that hang."""

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from lowrank import _deadlock


@pytest.mark.parametrize(
    ("version", "prone"),
    [
        ("0.4.30", True),
        ("0.10.2", True),  # hangs: shared/repro/jax_cpu_lapack_deadlock.py
        ("0.11.1", True),  # not checked, so the workaround stays on
        ("0.12.0.1", False),  # the repro finishes
        ("0.12.1.dev20261101", False),
        ("0.13.0", False),
        ("1.0.0", False),
    ],
)
def test_versions_before_the_fix_are_prone(version, prone):
    assert _deadlock.deadlock_prone(version) is prone


def test_an_unreadable_version_is_an_error():
    with pytest.raises(ValueError, match="cannot read a jaxlib version from 'unknown'"):
        _deadlock.deadlock_prone("unknown")


def test_the_switch_reads_the_installed_jaxlib():
    major, minor = (int(p) for p in jaxlib.__version__.split(".")[:2])
    assert _deadlock.DEADLOCK_PRONE is ((major, minor) < (0, 12))


def _tied(x, dep):
    """Whether ``after(x, dep)``'s program reads ``dep`` (a fresh trace: jax caches traces)."""
    closed = jax.make_jaxpr(lambda x, dep: _deadlock.after(x, dep))(x, dep)
    dep_var = closed.jaxpr.invars[1]
    return any(v is dep_var for eqn in closed.eqns for v in eqn.invars)


@pytest.mark.parametrize("prone", [True, False], ids=["prone", "fixed"])
def test_after_and_serial_act_only_where_prone(monkeypatch, prone):
    """On either side of the fix: ties only where prone, and the values never change."""
    monkeypatch.setattr(_deadlock, "DEADLOCK_PRONE", prone)
    x, dep = jnp.array([1.5, -2.0]), jnp.array([jnp.nan, 3.0])
    assert _tied(x, dep) is prone
    run = _deadlock.Serial()
    first = run(jnp.linalg.qr, jnp.eye(3) * 2)
    second = jax.make_jaxpr(lambda m: run(jnp.linalg.qr, m))(jnp.eye(3))
    reads_first = any(isinstance(c, jax.Array) for c in second.consts)
    assert reads_first is prone
    np.testing.assert_array_equal(_deadlock.after(x, dep), x)
    np.testing.assert_allclose(jnp.abs(first[1]), 2 * np.eye(3))
