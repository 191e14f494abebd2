"""TPU readiness, checked on CPU: every public jitted entry point exports for TPU.

``jax.export`` with ``platforms=["tpu"]`` lowers through the TPU rules and fails on any custom
call that exists only on CPU/GPU (LAPACK ``geev``, cuSOLVER, ...), so passing means the path
has none.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax import export

import lowrank
from benchmarks.helpers import gpt2_config
from lowrank import circuits
from lowrank.factored import FactoredMatrix
from lowrank.models import ModelConfig, TransformerModel, init_params

GPT2 = gpt2_config(2, 4, 32, d_mlp=64, d_vocab=50, n_ctx=16)
GPT_NEO = dataclasses.replace(
    GPT2,
    architecture="GPTNeoForCausalLM",
    attn_types=("global", "local"),
    window_size=4,
    use_attn_scale=False,
)


def _model(config: ModelConfig = GPT2) -> TransformerModel:
    """A model of abstract parameters: exporting needs their shapes and dtypes, not values."""
    return TransformerModel(jax.eval_shape(lambda: init_params(config, jax.random.key(0))), config)


def _factored(square: bool) -> FactoredMatrix:
    a, b = jax.random.split(jax.random.key(1))
    r = 12 if square else 9
    return FactoredMatrix(jax.random.normal(a, (2, 3, 12, 5)), jax.random.normal(b, (2, 3, 5, r)))


_TOKENS = jnp.zeros((2, 7), jnp.int32)


def _forward(model: TransformerModel, tokens: jax.Array) -> jax.Array:
    return model.forward(tokens)


ENTRY_POINTS = {
    "eigvals": (lowrank.eigvals, lambda: (_factored(True),)),
    "eig": (lowrank.eig, lambda: (_factored(True),)),
    "svd": (lowrank.svd, lambda: (_factored(False),)),
    "svdvals": (lowrank.svdvals, lambda: (_factored(False),)),
    "norm": (lowrank.norm, lambda: (_factored(False),)),
    "trace": (lowrank.trace, lambda: (_factored(True),)),
    "low_rank_approx": (lambda M: lowrank.low_rank_approx(M, 2).AB, lambda: (_factored(False),)),
    "copying_scores": (circuits.copying_scores, lambda: (_model(),)),
    "copying_scores_ov": (lambda m: circuits.copying_scores(m, full=False), lambda: (_model(),)),
    "composition_scores_Q": (lambda m: circuits.composition_scores(m, "Q"), lambda: (_model(),)),
    "composition_scores_K": (lambda m: circuits.composition_scores(m, "K"), lambda: (_model(),)),
    "composition_scores_V": (lambda m: circuits.composition_scores(m, "V"), lambda: (_model(),)),
    "forward_gpt2": (_forward, lambda: (_model(), _TOKENS)),
    "forward_gpt_neo": (_forward, lambda: (_model(GPT_NEO), _TOKENS)),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_exports_for_tpu(name):
    fn, make_args = ENTRY_POINTS[name]
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*make_args())
    assert exported.platforms == ("tpu",)
    text = exported.mlir_module()
    assert "lapack" not in text and "cusolver" not in text, name


def test_eig_of_cpu_only_lapack_would_not_export():
    """The check can fail: XLA's own eig has no TPU lowering."""
    with pytest.raises(NotImplementedError):
        export.export(jax.jit(jnp.linalg.eigvals), platforms=["tpu"])(jnp.eye(3))
