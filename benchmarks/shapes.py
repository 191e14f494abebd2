"""Model shapes, one set of random weights per shape, and the TransformerLens twin of a model.

A :class:`Weights` holds a canonical parameter tree in NumPy (float32, layers stacked, the
layout documented in :mod:`lowrank.models`). The lowrank model and the TransformerLens
tensors are both made from those same arrays.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lowrank
from lowrank.models import ModelConfig, TransformerModel, init_params

EMBEDDED = "embedded"
WEIGHT_SCALE = 0.02  # std of the random weights, like GPT-2's initialiser and trained weights


def _gpt2(n_layers: int, n_heads: int, d_model: int, **kw: Any) -> ModelConfig:
    return ModelConfig(
        architecture="GPT2LMHeadModel",
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=kw.pop("d_vocab", 50257),
        n_ctx=kw.pop("n_ctx", 1024),
        **kw,
    )


def _gpt_neo(n_layers: int, n_heads: int, d_model: int) -> ModelConfig:
    return ModelConfig(
        architecture="GPTNeoForCausalLM",
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=50257,
        n_ctx=2048,
        attn_types=("global", "local") * (n_layers // 2),
        window_size=256,
        use_attn_scale=False,
    )


#: Shapes of published models (their config.json), plus ``tiny`` for tests.
SHAPES: dict[str, ModelConfig] = {
    "tiny": _gpt2(2, 4, 64, d_vocab=500, n_ctx=128),
    "gpt2-small": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "gpt-neo-125M": _gpt_neo(12, 12, 768),
}
SHAPE_NAMES = (*SHAPES, EMBEDDED)


class Unavailable(RuntimeError):
    """A shape that cannot be built in this checkout (the message says why)."""


@dataclasses.dataclass
class Weights:
    """One set of weights: the canonical tree in NumPy and its config."""

    name: str
    config: ModelConfig
    params: dict[str, Any]  # nested dicts of np.ndarray (float32)
    source: str  # "random N(0, 0.02^2), seed 0" or where the weights came from

    def flat(self) -> dict[str, np.ndarray]:
        """``{"blocks.attn.W_Q": array, ...}``."""
        return {
            ".".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(self.params)
        }

    def lowrank_model(self) -> TransformerModel:
        """A lowrank ``TransformerModel`` with these weights, on the default device."""
        return TransformerModel(params=jax.device_put(self.params), config=self.config)


def random_weights(name: str, config: ModelConfig, seed: int = 0) -> Weights:
    """Weights ~ N(0, 0.02^2), biases likewise, LayerNorm scales 1 + N(0, 0.02^2)."""
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(lambda: init_params(config, key))  # the library's own layout
    rng = np.random.default_rng(seed)

    def fill(path: Any, spec: Any) -> np.ndarray:
        leaf = str(getattr(path[-1], "key", path[-1]))
        x = rng.standard_normal(spec.shape, dtype=np.float32)
        x *= np.float32(WEIGHT_SCALE)
        is_ln_scale = leaf == "w" and any(str(getattr(p, "key", "")).startswith("ln") for p in path)
        return x + np.float32(1.0) if is_ln_scale else x

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    return Weights(name, config, params, f"random N(0, {WEIGHT_SCALE}^2), seed {seed}")


def embedded_weights() -> Weights:
    """The package's embedded model (``lowrank.load_pretrained()``), if this checkout has it."""
    load = lowrank.load_pretrained
    params = list(inspect.signature(load).parameters.values())
    if params and params[0].default is not inspect.Parameter.empty:
        try:
            model = load()  # the no-argument form loads the embedded model
        except (lowrank.models.CheckpointError, OSError) as err:
            raise Unavailable(f"lowrank.load_pretrained() failed: {err}") from err
    else:
        name = getattr(lowrank.models, "EMBEDDED_MODEL", "")
        data = Path(lowrank.__file__).parent / "data"
        found = [d for d in (data / name, data) if (d / "config.json").is_file()]
        if not found:
            raise Unavailable(
                "the embedded model is not available in this lowrank checkout: "
                "lowrank.load_pretrained() needs a name, and there is no "
                f"{data / name}/config.json"
            )
        model = load(found[0])
    tree = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), model.params)
    return Weights(EMBEDDED, model.config, tree, "lowrank.load_pretrained() (embedded model)")


def build_weights(name: str, seed: int = 0) -> Weights:
    """Weights for the shape ``name``: the embedded model's, or random ones (from ``seed``)."""
    if name == EMBEDDED:
        return embedded_weights()
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {', '.join(SHAPE_NAMES)}")
    return random_weights(name, SHAPES[name], seed)


# ------------------------------------------------------------------ TransformerLens side
def tl_config(config: ModelConfig, *, ln_folded: bool, device: str) -> Any:
    """A ``HookedTransformerConfig`` for the same architecture (as TL derives it from HF)."""
    from transformer_lens import HookedTransformerConfig

    local = config.attn_types is not None and "local" in config.attn_types
    extra: dict[str, Any] = {}
    if local:
        extra = dict(attn_types=list(config.attn_types or ()), window_size=config.window_size)
    return HookedTransformerConfig(
        d_model=config.d_model,
        d_head=config.d_head,
        n_heads=config.n_heads,
        d_mlp=config.d_mlp,
        n_layers=config.n_layers,
        n_ctx=config.n_ctx,
        d_vocab=config.d_vocab,
        eps=config.eps,
        act_fn=config.act_fn,
        use_attn_scale=config.use_attn_scale,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        use_local_attn=local,
        normalization_type="LNPre" if ln_folded else "LN",
        original_architecture=config.architecture,
        init_weights=False,
        default_prepend_bos=False,
        device=device,
        **extra,
    )


def tl_state_dict(weights: Weights) -> dict[str, np.ndarray]:
    """The canonical tree unstacked per layer: ``blocks.{l}.attn.W_Q`` etc."""
    out: dict[str, np.ndarray] = {}
    for key, value in weights.flat().items():
        if key.startswith("blocks."):
            rest = key[len("blocks.") :]
            out.update({f"blocks.{i}.{rest}": value[i] for i in range(weights.config.n_layers)})
        else:
            out[key] = value
    return out


def hooked_transformer(weights: Weights, device: str) -> Any:
    """A ``HookedTransformer`` holding a copy of ``weights`` (no weight processing)."""
    import torch
    from transformer_lens import HookedTransformer

    ln_folded = "ln1" not in weights.params["blocks"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(tl_config(weights.config, ln_folded=ln_folded, device=device))
    state = {k: torch.from_numpy(v) for k, v in tl_state_dict(weights).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]
    if missing or unexpected:
        raise RuntimeError(f"TL state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()
