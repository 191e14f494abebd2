"""Model shapes and their weights: random ones per shape, the embedded model, a checkpoint.

A :class:`Weights` holds a canonical parameter tree in NumPy (float32, layers stacked, the
layout documented in :mod:`lowrank.models`). The lowrank model and the TransformerLens
tensors (:mod:`benchmarks.mirror`) are both made from those same arrays.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lowrank
from benchmarks.helpers import flatten, gpt2_config
from lowrank.models import ModelConfig, TransformerModel, init_params, load_pretrained, read_config

EMBEDDED = "embedded"
WEIGHT_SCALE = 0.02  # std of the random weights, like GPT-2's initialiser and trained weights


def _gpt_neo(n_layers: int, n_heads: int, d_model: int) -> ModelConfig:
    return gpt2_config(
        n_layers,
        n_heads,
        d_model,
        architecture="GPTNeoForCausalLM",
        n_ctx=2048,
        attn_types=("global", "local") * (n_layers // 2),
        window_size=256,
        use_attn_scale=False,
    )


#: Shapes of published models (their config.json), plus ``tiny`` for tests.
SHAPES: dict[str, ModelConfig] = {
    "tiny": gpt2_config(2, 4, 64, d_vocab=500, n_ctx=128),
    "gpt2-small": gpt2_config(12, 12, 768),
    "gpt2-medium": gpt2_config(24, 16, 1024),
    "gpt2-xl": gpt2_config(48, 25, 1600),
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
    #: The Hugging Face checkpoint folder the (processed) tree was loaded from, if any.
    checkpoint: Path | None = None

    def flat(self) -> dict[str, np.ndarray]:
        """``{"blocks.attn.W_Q": array, ...}``."""
        return flatten(self.params)

    def lowrank_model(self) -> TransformerModel:
        """A lowrank ``TransformerModel`` with these weights, on the default device."""
        return TransformerModel(params=jax.device_put(self.params), config=self.config)


def unstored_leaves(config: ModelConfig) -> frozenset[str]:
    """Dotted leaf paths that a Hugging Face checkpoint of ``config`` does not store.

    lowrank reads them as zeros (GPT-2's unembedding bias ``unembed.b_U``, GPT-Neo's query,
    key and value biases, ...).
    """
    from lowrank.models.loading import LAYOUTS

    layout = LAYOUTS[config.family]
    absent = [p for row in layout.tensors if not row.stored(config) for p in row.leaf_paths]
    return frozenset([*layout.zeros, *absent])


def random_weights(name: str, config: ModelConfig, seed: int = 0) -> Weights:
    """Weights ~ N(0, 0.02^2), biases likewise, LayerNorm scales 1 + N(0, 0.02^2).

    Leaves that the family's checkpoints do not store (:func:`unstored_leaves`) are zero, so
    the tree is a Hugging Face model's (TransformerLens 4 runs it as one).
    """
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(lambda: init_params(config, key))  # the library's own layout
    rng = np.random.default_rng(seed)
    zeros = unstored_leaves(config)

    def fill(path: Any, spec: Any) -> np.ndarray:
        leaf = str(getattr(path[-1], "key", path[-1]))
        x = rng.standard_normal(spec.shape, dtype=np.float32)
        if ".".join(str(getattr(p, "key", p)) for p in path) in zeros:
            return np.zeros_like(x)
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
            folder = _embedded_folder()
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
        model, folder = load(found[0]), found[0]
    tree = jax.tree_util.tree_map(lambda x: np.array(x, dtype=np.float32), model.params)
    source = "lowrank.load_pretrained() (embedded model)"
    return Weights(EMBEDDED, model.config, tree, source, folder)


def _embedded_folder() -> Path | None:
    """The embedded model's checkpoint folder, or ``None`` where lowrank does not say."""
    try:
        return Path(lowrank.models.embedded_model_path())
    except (AttributeError, ValueError, OSError, lowrank.models.CheckpointError):
        return None


def build_weights(name: str, seed: int = 0) -> Weights:
    """Weights for the shape ``name``: the embedded model's, or random ones (from ``seed``)."""
    if name == EMBEDDED:
        return embedded_weights()
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {', '.join(SHAPE_NAMES)}")
    return random_weights(name, SHAPES[name], seed)


def checkpoint_label(path: Path, config: ModelConfig) -> str:
    """The results' shape name of a checkpoint: ``"<folder> (<architecture>)"``."""
    return f"{path.expanduser().resolve().name} ({config.architecture})"


def check_checkpoint(path: Path) -> ModelConfig:
    """The config of the HF checkpoint directory ``path``.

    Raises:
        NotADirectoryError: ``path`` is not a directory.
        lowrank.models.CheckpointError: no readable ``config.json``, or an architecture
            lowrank does not load.
    """
    if not path.is_dir():
        raise NotADirectoryError(
            f"{str(path)!r} is not a directory (expected a Hugging Face checkpoint folder: "
            "config.json + safetensors)"
        )
    return read_config(path)


def checkpoint_weights(path: Path) -> Weights:
    """The weights of a local HF checkpoint, processed as TransformerLens's ``from_pretrained``.

    ``lowrank.models.load_pretrained`` with its defaults (LayerNorm / RMSNorm folded, writing
    weights and unembedding centred where TL centres them, value biases folded), as float32.
    """
    config = check_checkpoint(path)
    model = load_pretrained(path, tokenizer=False, config=config)
    tree = jax.tree_util.tree_map(lambda x: np.array(x, dtype=np.float32), model.params)
    source = f"checkpoint {path}, processed as TransformerLens's from_pretrained"
    return Weights(checkpoint_label(path, config), model.config, tree, source, path)
