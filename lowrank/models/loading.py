"""load_pretrained: a local directory or hub id -> :class:`TransformerModel`.

The steps are separate public functions, so each can be replaced (a later sharded loader
places tensors straight from the memory-mapped files):

1. :func:`~lowrank.models.hub.resolve_checkpoint` -- local directory, or a snapshot from the
   Hugging Face hub.
2. :func:`~lowrank.models.checkpoint.open_state_dict` -- a lazy mapping over
   ``model.safetensors`` (or its shards), read through memory mapping one tensor at a time.
3. :func:`convert_state_dict` -- HF tensors -> canonical NumPy tree (per family).
4. :func:`~lowrank.models.processing.process_params` -- fold/centre, on the host.
5. :func:`place_params` -- cast and put each leaf on a device (a ``place`` hook per leaf).

Host memory stays under twice the weights: converting holds the tree plus one tensor
(the file is memory-mapped, never read whole), each processing step adds only the leaves
it replaces (about 1.6x in all for GPT-2 shapes), and placing releases each host leaf once
it is on the device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.models._common import CheckpointError, Params, dotted_path
from lowrank.models.checkpoint import CONFIG_FILE, TOKENIZER_FILES, StateDict, open_state_dict
from lowrank.models.config import ModelConfig, config_from_hf
from lowrank.models.conversion import convert
from lowrank.models.gpt2 import GPT2_LAYOUT
from lowrank.models.gpt_neo import GPT_NEO_LAYOUT
from lowrank.models.gpt_neox import GPT_NEOX_LAYOUT
from lowrank.models.hub import (
    EMBEDDED_MODEL,
    resolve_checkpoint,
)
from lowrank.models.llama import GEMMA2_LAYOUT, GEMMA_LAYOUT, LLAMA_LAYOUT
from lowrank.models.model import TransformerModel
from lowrank.models.processing import process_params

__all__ = [
    "AUTO",
    "convert_state_dict",
    "load_pretrained",
    "load_tokenizer",
    "place_params",
    "processing_steps",
    "read_config",
    "stored_dtype",
]

#: The layout of each :attr:`ModelConfig.family`.
LAYOUTS = {
    layout.family: layout
    for layout in (
        GPT2_LAYOUT,
        GPT_NEO_LAYOUT,
        GPT_NEOX_LAYOUT,
        LLAMA_LAYOUT,
        GEMMA_LAYOUT,
        GEMMA2_LAYOUT,
    )
}

#: ``place`` hook: (dotted leaf path, host array) -> placed array.
PlaceFn = Callable[[str, np.ndarray], Any]

#: The processing steps, with TransformerLens's defaults (``from_pretrained``).
_TL_DEFAULTS = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}


def _skipped_by_tl(config: ModelConfig, step: str) -> str | None:
    """Why TransformerLens does not apply ``step`` to this model (``None``: it does)."""
    if step == "center_writing_weights" and config.normalization == "RMS":
        return (
            "TransformerLens does not centre the writing weights of RMSNorm models (RMSNorm "
            "does not subtract the mean, so centring would change the model)"
        )
    if step == "center_unembed" and config.final_softcap is not None:
        return (
            "TransformerLens does not centre the unembedding of models that soft-cap their "
            "logits (soft-capping is not invariant to adding a constant to the logits)"
        )
    return None


def _not_implemented(config: ModelConfig, step: str) -> str | None:
    """Why lowrank's processing cannot yet apply ``step`` to this model (``None``: it can)."""
    if step == "refactor_factored_attn_matrices" and config.group_size > 1:
        return "refactoring grouped (n_kv_heads < n_heads) attention matrices"
    return None


def processing_steps(config: ModelConfig, **flags: bool | None) -> dict[str, bool]:
    """The processing steps to run for ``config``, each flag given or its family default.

    A flag left ``None`` takes TransformerLens's default for the model (``fold_ln``,
    ``center_writing_weights``, ``center_unembed``, ``fold_value_biases`` on,
    ``refactor_factored_attn_matrices`` off), less the steps TransformerLens skips for it
    (it does not centre RMSNorm models' writing weights) and those lowrank cannot yet apply
    to it (refactoring grouped-query attention).

    Raises:
        ValueError: an unknown flag, or a step TransformerLens does not apply to the model.
        NotImplementedError: a step lowrank's processing cannot yet apply to the model.
    """
    unknown = set(flags) - set(_TL_DEFAULTS)
    if unknown:
        raise ValueError(f"processing_steps: unknown steps {sorted(unknown)}")
    steps = {}
    for step, tl_default in _TL_DEFAULTS.items():
        flag = flags.get(step)
        skipped, missing = _skipped_by_tl(config, step), _not_implemented(config, step)
        if flag is None:
            flag = tl_default and skipped is None and missing is None
        elif flag and skipped:
            raise ValueError(f"{step}=True for {config.architecture}: {skipped}; pass False")
        elif flag and missing:
            raise NotImplementedError(
                f"{step}=True for {config.architecture}: {missing} is not implemented yet; "
                f"pass {step}=False (or leave it None for the model's default)"
            )
        steps[step] = bool(flag)
    return steps


def read_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` of the checkpoint in ``directory`` (its ``config.json``)."""
    path = Path(directory).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"missing file {str(path)!r}: a checkpoint needs its config.json")
    try:
        return config_from_hf(path)
    except ValueError as err:
        where = "" if str(path) in str(err) else f" (in {str(path)!r})"
        raise CheckpointError(f"{err}{where}") from err


def convert_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None
) -> Params:
    """HF state dict -> canonical tree, through the layout of ``config.family``."""
    return convert(LAYOUTS[config.family], state_dict, config, dtype=dtype)


def place_params(params: Params, *, dtype: Any = None, place: PlaceFn | None = None) -> Params:
    """Cast each leaf to ``dtype`` on the host and hand it to ``place`` (a device put).

    Args:
        params: a tree of NumPy arrays.
        dtype: target dtype (``None`` keeps each leaf's dtype).
        place: ``place(path, array) -> jax.Array`` with ``path`` like ``"blocks.attn.W_Q"``;
            default ``jax.device_put`` onto the default device. Use it to shard.
    """
    put: PlaceFn = place if place is not None else (lambda _path, x: jax.device_put(x))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    del params  # when the caller holds no other reference, host leaves go as they are placed
    paths = [path for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    del flat
    placed = []
    for i, path in enumerate(paths):
        x, leaves[i] = leaves[i], None
        if dtype is not None and x.dtype != dtype:
            x = x.astype(dtype)
        placed.append(put(dotted_path(path), x))
        del x
    return jax.tree_util.tree_unflatten(treedef, placed)


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(directory)`` if tokenizer files exist, else ``None``.

    Never raises: a tokenizer that fails to load gives a warning and ``None``.
    """
    d = Path(directory).expanduser()
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d))
    except Exception as err:
        warnings.warn(
            f"could not load the tokenizer in {str(d)!r} ({type(err).__name__}: {err}); "
            "the model is loaded without one",
            stacklevel=2,
        )
        return None


#: The parameter dtypes lowrank loads into.
_DTYPES = tuple(np.dtype(t) for t in (jnp.bfloat16, np.float16, np.float32, np.float64))

#: ``load_pretrained(dtype=AUTO)``: keep the checkpoint's dtype (transformers' ``"auto"``).
AUTO = "auto"


def stored_dtype(state_dict: StateDict, config: ModelConfig) -> np.dtype[Any]:
    """The dtype a checkpoint stores its weights in, as ``load_pretrained(dtype="auto")`` keeps.

    That of its embedding (transformers' ``dtype="auto"`` takes the first weight's); float32
    where that is float64 without ``jax_enable_x64``, or a dtype lowrank does not compute in
    (float8).
    """
    layout = LAYOUTS[config.family]
    first = layout.tensors[0].key
    key = next((k for k in (first, *(p + first for p in layout.prefixes)) if k in state_dict), None)
    if key is None:
        raise CheckpointError(f"{layout.name} state dict: missing key {first!r}")
    dt = np.dtype(jax.dtypes.canonicalize_dtype(state_dict.dtype(key)))
    return dt if dt in _DTYPES else np.dtype(np.float32)


def _check_dtype(dtype: Any) -> np.dtype[Any] | None:
    if isinstance(dtype, str) and dtype == AUTO:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"load_pretrained: dtype must be a float dtype or 'auto', got {dtype!r}"
        ) from None
    if dt not in _DTYPES:
        raise TypeError(
            f"load_pretrained: dtype must be bfloat16, float16, float32 or float64, got {dt}"
        )
    if dt == np.float64 and jax.dtypes.canonicalize_dtype(np.float64) != np.float64:
        raise ValueError(
            "load_pretrained: dtype float64 needs jax_enable_x64 "
            "(jax.config.update('jax_enable_x64', True))"
        )
    return dt


def load_pretrained(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    fold_ln: bool | None = None,
    center_writing_weights: bool | None = None,
    center_unembed: bool | None = None,
    fold_value_biases: bool | None = None,
    refactor_factored_attn_matrices: bool | None = None,
    dtype: Any = jnp.float32,
    allow_pickle: bool = False,
    place: PlaceFn | None = None,
    tokenizer: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    config: ModelConfig | None = None,
) -> TransformerModel:
    """Load a GPT-2, GPT-Neo, GPT-NeoX, Llama, Mistral, Qwen2, Gemma or Gemma-2 checkpoint.

    Args:
        name_or_path: a local directory (``config.json`` + ``model.safetensors`` or a
            sharded ``model.safetensors.index.json``) or a Hugging Face hub id. ``None``
            (or :data:`EMBEDDED_MODEL`, ``"induction-2l"``) loads the small model shipped
            with the package, offline.
        fold_ln, center_writing_weights, center_unembed, fold_value_biases,
            refactor_factored_attn_matrices: TransformerLens's processing steps (see
            :mod:`lowrank.models.processing`); ``None`` takes the model's default (see
            :func:`processing_steps`: TransformerLens's, that is all but refactoring, and
            no centring of writing weights for RMSNorm models). Processing runs in float32
            (float64 for ``dtype=float64``) before the cast to ``dtype``.
        dtype: parameter dtype on the device: ``jnp.float32`` (the default, as
            TransformerLens), ``jnp.bfloat16``, ``jnp.float16`` or ``jnp.float64`` (with
            ``jax_enable_x64``) casts every weight; ``"auto"`` keeps the checkpoint's dtype
            (:func:`stored_dtype`: a checkpoint stored in bfloat16, as most Llama, Mistral
            and Qwen2 checkpoints are, loads as bfloat16, at half the memory of float32).
            So a bfloat16 checkpoint loads as float32 by default (its values exactly:
            bfloat16 -> float32 is lossless) and as bfloat16 with ``dtype="auto"`` or
            ``dtype=jnp.bfloat16``.
        allow_pickle: allow ``pytorch_model.bin`` when no safetensors exist (read with
            ``torch.load(weights_only=True)``).
        place: per-leaf device placement hook, see :func:`place_params`.
        tokenizer: load the tokenizer when its files are present (``False`` skips it).
        revision, cache_dir: for hub ids.
        config: the checkpoint's :func:`read_config`, when the caller has read it already
            (default: read from the checkpoint).

    Raises:
        CheckpointError: missing/corrupt files, a bad config.json, bad keys, shapes or
            dtypes, shards outside the checkpoint, unreachable hub ids.
        ValueError: unsupported architecture; a ``revision`` that is not a branch, tag or
            commit name; a processing step TransformerLens does not apply to the model.
        NotImplementedError: a processing step lowrank cannot yet apply to the model.
    """
    requested = _check_dtype(dtype)
    directory = resolve_checkpoint(
        EMBEDDED_MODEL if name_or_path is None else name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        allow_pickle=allow_pickle,
    )
    config = read_config(directory) if config is None else config
    steps = processing_steps(
        config,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )
    with open_state_dict(directory, allow_pickle=allow_pickle) as state_dict:
        dt = stored_dtype(state_dict, config) if requested is None else requested
        if not any(steps.values()):  # straight to dt: a bf16 load never holds float32
            params = place_params(
                convert_state_dict(state_dict, config, dtype=dt), dtype=dt, place=place
            )
        else:  # processing runs in float32 (float64 for float64)
            compute = np.float64 if dt == np.float64 else np.float32
            # One expression, so no local name keeps the unprocessed tree alive while
            # processing (each step frees the leaves it replaced) or the host tree while
            # placing. Plain keyword arguments, not **steps: CPython hands the tree over to
            # a plain call, while a call with ** keeps its own reference until it returns
            # (1.55x -> 2.3x the weights).
            params = place_params(
                process_params(
                    convert_state_dict(state_dict, config, dtype=compute),
                    fold_ln=steps["fold_ln"],
                    center_writing_weights=steps["center_writing_weights"],
                    center_unembed=steps["center_unembed"],
                    fold_value_biases=steps["fold_value_biases"],
                    refactor_factored_attn_matrices=steps["refactor_factored_attn_matrices"],
                ),
                dtype=dt,
                place=place,
            )
    tok = load_tokenizer(directory) if tokenizer else None
    return TransformerModel(params=params, config=config, tokenizer=tok)
