"""Canonical parameter tree -> Hugging Face checkpoint: the inverse of the layout tables.

:func:`hf_state_dict` lays an *unprocessed* canonical tree out as the state dict of its
family's ``...ForCausalLM`` by reading the same :class:`~lowrank.models.layout.Layout` rows
that loading reads, backwards: each row's leaves (one layer at a time) go through the inverse
of its transform (:data:`INVERSE_TRANSFORMS`, keyed by the forward transform), fused rows are
put back together (the inverse of their :class:`~lowrank.models.layout.Split`), and the keys
get the base model's prefix (``transformer.``, ``model.``, ``gpt_neox.``) except the
unembedding, which lies outside the base model (``lm_head.weight``). So GPT-2, GPT-Neo,
GPT-NeoX and the Llama layout (Llama, Mistral, Qwen2) share one exporter.

:func:`save_pretrained` writes that state dict as ``model.safetensors`` (or ``shards``
files with a ``model.safetensors.index.json``, as transformers shards) beside a
``config.json`` (:func:`hf_config_dict`), each file written atomically; the directory loads
in :func:`lowrank.models.load_pretrained` and in ``transformers.AutoModelForCausalLM``.

Round trip: ``convert(layout, hf_state_dict(p, c), c) == p`` exactly (same dtypes too), for
every unprocessed tree ``p`` whose leaves that the checkpoint does not store are zero (GPT-2's
``b_U``, Llama's MLP biases, biases the config says are absent) and, when
``c.tie_word_embeddings``, whose ``W_U`` is the tied embedding's.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.models._common import LN_PATHS, Params, dotted_path
from lowrank.models.checkpoint import CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX
from lowrank.models.config import _HF_KEYS, ModelConfig, config_from_hf
from lowrank.models.conversion import convert
from lowrank.models.layout import (
    ZEROS,
    Layout,
    Tensor,
    bias_per_head,
    dims,
    o_from_conv1d,
    o_from_linear,
    qkv_from_conv1d,
    qkv_from_linear,
    sizes,
    state_dict_shapes,
    transpose,
)

__all__ = [
    "INVERSE_TRANSFORMS",
    "gpt2_config_dict",
    "gpt2_state_dict",
    "hf_config_dict",
    "hf_state_dict",
    "llama_config_dict",
    "save_pretrained",
]

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_WRITABLE = tuple(np.dtype(t) for t in (jnp.bfloat16, np.float16, np.float32, np.float64))


# ------------------------------------------------------------------ inverse transforms
def _heads_to_bias(x: Any, d_head: int) -> Any:
    """``[H, d_head] -> [H * d_head]`` (inverse of ``bias_per_head``)."""
    return x.reshape(-1)


def _qkv_to_conv1d(x: Any, d_head: int) -> Any:
    """``[H, d_model, d_head]`` -> ``Conv1D`` ``[d_model, H * d_head]``."""
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


def _qkv_to_linear(x: Any, d_head: int) -> Any:
    """``[H, d_model, d_head]`` -> ``nn.Linear`` ``[H * d_head, d_model]``."""
    return x.transpose(0, 2, 1).reshape(-1, x.shape[1])


def _o_to_conv1d(x: Any, d_head: int) -> Any:
    """``[H, d_head, d_model]`` -> ``Conv1D`` ``[H * d_head, d_model]``."""
    return x.reshape(-1, x.shape[2])


def _o_to_linear(x: Any, d_head: int) -> Any:
    """``[H, d_head, d_model]`` -> ``nn.Linear`` ``[d_model, H * d_head]``."""
    return x.reshape(-1, x.shape[2]).T


#: forward transform of a layout row -> its inverse (canonical part -> stored layout).
INVERSE_TRANSFORMS: dict[Callable[[Any, int], Any], Callable[[Any, int], Any]] = {
    transpose: transpose,
    bias_per_head: _heads_to_bias,
    qkv_from_conv1d: _qkv_to_conv1d,
    qkv_from_linear: _qkv_to_linear,
    o_from_conv1d: _o_to_conv1d,
    o_from_linear: _o_to_linear,
}


def _inverse(row: Tensor) -> Callable[[Any, int], Any]:
    if row.transform is None:
        return lambda x, _d_head: x
    inverse = INVERSE_TRANSFORMS.get(row.transform)
    if inverse is None:
        name = getattr(row.transform, "__name__", repr(row.transform))
        raise NotImplementedError(
            f"hf_state_dict: no inverse of transform {name!r} (row {row.key!r}); add one to "
            "lowrank.models.export.INVERSE_TRANSFORMS"
        )
    return inverse


def _unsplit(row: Tensor, parts: list[np.ndarray], d_head: int) -> np.ndarray:
    """The fused tensor whose ``row.split`` parts are ``parts`` (the inverse of the split)."""
    split = row.split
    if split is None:
        return parts[0]
    axis = split.axis % parts[0].ndim
    if not split.per_head:
        return np.concatenate(parts, axis=axis)
    shape = parts[0].shape
    heads = [p.reshape(*shape[:axis], -1, d_head, *shape[axis + 1 :]) for p in parts]
    fused = np.stack(heads, axis=axis + 1)  # [..., heads, parts, d_head, ...]
    return fused.reshape(*shape[:axis], -1, *shape[axis + 1 :])


# ------------------------------------------------------------------ the tree, checked
def _layout(config: ModelConfig) -> Layout:
    from lowrank.models.loading import LAYOUTS

    if config.family not in LAYOUTS:
        raise ValueError(f"hf_state_dict: no layout for {config.architecture}")
    return LAYOUTS[config.family]


def _canonical_shapes(layout: Layout, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Dotted leaf path -> shape, as loading ``config`` builds the tree (traced, no data)."""
    flatten = jax.tree_util.tree_flatten_with_path
    abstract = {
        k: jax.ShapeDtypeStruct(s, jnp.float32)
        for k, s in state_dict_shapes(layout, config).items()
    }
    tree = jax.eval_shape(lambda sd: convert(layout, sd, config), abstract)
    shapes = {dotted_path(p): tuple(x.shape) for p, x in flatten(tree)[0]}
    order = [*(p for row in layout.tensors for p in row.leaf_paths), *layout.zeros]
    return {path: shapes[path] for path in order}  # in the layout's order


def _host_leaves(params: Params, config: ModelConfig, layout: Layout) -> dict[str, np.ndarray]:
    """Every leaf of ``params`` as a NumPy array, checked against the canonical shapes."""
    want = _canonical_shapes(layout, config)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    have = {dotted_path(path): leaf for path, leaf in flat}
    for path in want:
        if path in have:
            continue
        if path.startswith(LN_PATHS):
            raise ValueError(
                f"hf_state_dict: params has no {path!r}: the tree has folded LayerNorms. "
                f"{layout.name} checkpoints hold LayerNorm weights, so export an unprocessed "
                "tree (load_pretrained(..., fold_ln=False, center_writing_weights=False, "
                "center_unembed=False, fold_value_biases=False))"
            )
        raise ValueError(f"hf_state_dict: params has no {path!r}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"hf_state_dict: {layout.name} checkpoints have no place for {extra}")
    out = {}
    for path, shape in want.items():
        arr = np.asarray(have[path])
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"hf_state_dict: {path!r} must be a float array, got {arr.dtype}")
        if arr.dtype not in _WRITABLE:  # float8 and other ml_dtypes
            arr = arr.astype(np.float32)
        if arr.shape != shape:
            raise ValueError(f"hf_state_dict: {path!r} has shape {arr.shape}, expected {shape}")
        out[path] = arr
    return out


def _check_zero(leaves: dict[str, np.ndarray], paths: list[str], layout: Layout) -> None:
    for path in paths:
        if np.any(leaves[path] != 0):
            raise ValueError(
                f"hf_state_dict: {path} is non-zero, but this {layout.name} checkpoint has no "
                "such tensor (a processed tree? export the unprocessed one, or a config that "
                "stores it)"
            )


def _unstored(layout: Layout, config: ModelConfig) -> list[str]:
    """Leaves the checkpoint does not store: the layout's zeros and absent biases."""
    absent = [p for row in layout.tensors if not row.stored(config) for p in row.leaf_paths]
    return [*layout.zeros, *absent]


# ------------------------------------------------------------------ the state dict
def _row_tensor(row: Tensor, leaves: dict[str, np.ndarray], layer: int | None, d_head: int) -> Any:
    inverse = _inverse(row)
    parts = [
        inverse(leaves[p] if layer is None else leaves[p][layer], d_head) for p in row.leaf_paths
    ]
    return np.array(_unsplit(row, parts, d_head), order="C", copy=True)


def _check_tied(row: Tensor, leaves: dict[str, np.ndarray], layout: Layout, d_head: int) -> None:
    """A tied row (read from another key when absent) must be what that key gives."""
    source = next(r for r in layout.tensors if r.key == row.if_missing)
    leaf = row.leaf_paths[0]
    forward = row.transform or (lambda x, _d: x)
    if not np.array_equal(forward(_row_tensor(source, leaves, None, d_head), d_head), leaves[leaf]):
        raise ValueError(
            f"hf_state_dict: config.tie_word_embeddings is True but {leaf} is not the tied "
            f"{source.key!r}; use a config with tie_word_embeddings=False to write {row.key!r}"
        )


def _layer_of(row: Tensor, key: str, n_layers: int) -> int | None:
    """The layer whose tensor ``key`` is (``None`` for a row without layers)."""
    if not row.per_layer:
        return None
    return next(i for i in range(n_layers) if row.key.format(i=i) == key)


#: ``(HF key, make the tensor, its shape, its dtype)``.
_Entry = tuple[str, Callable[[], np.ndarray], tuple[int, ...], np.dtype[Any]]


def _tensors(params: Params, config: ModelConfig) -> list[_Entry]:
    """Every tensor to write, in state-dict order; each is made only when called."""
    layout = _layout(config)
    leaves = _host_leaves(params, config, layout)
    _check_zero(leaves, _unstored(layout, config), layout)
    size, d_head = sizes(config), config.d_head
    prefix = layout.prefixes[0] if layout.prefixes else ""  # the base model's
    out: list[_Entry] = []
    for key, row in layout.keys(config.n_layers):
        if not row.stored(config):
            continue
        if row.if_missing not in (None, ZEROS) and config.tie_word_embeddings:
            _check_tied(row, leaves, layout, d_head)
            continue
        head = "unembed.W_U" in row.leaf_paths  # the LM head lies outside the base model
        layer = _layer_of(row, key, config.n_layers)
        dtype = np.result_type(*(leaves[p].dtype for p in row.leaf_paths))
        make = functools.partial(_row_tensor, row, leaves, layer, d_head)
        out.append((key if head else prefix + key, make, dims(row.shape, size), dtype))
    return out


def hf_state_dict(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face state dict (NumPy) of an unprocessed canonical tree, through its layout.

    Args:
        params: canonical tree with LayerNorm / RMSNorm weights (see :mod:`lowrank.models`);
            NumPy or jax arrays. Each tensor keeps its leaves' dtype (bfloat16 included;
            other narrow floats become float32).
        config: its :class:`ModelConfig`; ``tie_word_embeddings`` decides whether the LM
            head (``lm_head.weight``) is written, the bias flags which biases are.

    Returns:
        ``{"model.embed_tokens.weight": [d_vocab, d_model], ..., "lm_head.weight": ...}``
        (prefix per family), every array its own C-contiguous copy.

    Raises:
        ValueError: a processed (folded) tree, a missing or extra leaf, a wrong shape, a
            non-zero leaf the checkpoint cannot store, or tied embeddings that differ.
        TypeError: a non-float leaf.
        NotImplementedError: a layout row whose transform has no inverse.
    """
    return {name: make() for name, make, _, _ in _tensors(params, config)}


def gpt2_state_dict(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face ``GPT2LMHeadModel`` state dict of an unprocessed GPT-2 tree.

    See :func:`hf_state_dict`; ``config`` must be a GPT-2 config.
    """
    if config.family != "gpt2":
        raise ValueError(f"gpt2_state_dict: config is for {config.architecture}, not GPT-2")
    return hf_state_dict(params, config)


# ------------------------------------------------------------------ config.json
def _drop_foreign_token_ids(hf: dict[str, Any], d_vocab: int, given: set[str]) -> None:
    """Default BOS/EOS/PAD ids outside a smaller vocabulary become ``None``."""
    for name in _TOKEN_IDS:
        value = hf.get(name)
        if name not in given and isinstance(value, int) and value >= d_vocab:
            hf[name] = None


#: Per family, the config.json keys of the activation, the norm epsilon and the dropout
#: rates (written as 0: lowrank's forward pass has no dropout).
_ACT_EPS_DROPOUT: dict[str, str] = {
    "gpt2": "activation_function layer_norm_epsilon resid_pdrop embd_pdrop attn_pdrop",
    "gpt_neo": "activation_function layer_norm_epsilon embed_dropout attention_dropout "
    "resid_dropout",
    "gpt_neox": "hidden_act layer_norm_eps attention_dropout hidden_dropout",
    "llama": "hidden_act rms_norm_eps attention_dropout",
}


def _common_fields(config: ModelConfig) -> dict[str, Any]:
    """The sizes (through ``config_from_hf``'s own key table), activation, eps, dropouts."""
    act, eps, *dropouts = _ACT_EPS_DROPOUT[config.family].split()
    fields = {key: getattr(config, name) for key, name in _HF_KEYS[config.family].items()}
    fields.update({act: config.act_fn, eps: config.eps}, **dict.fromkeys(dropouts, 0.0))
    if config.d_mlp == 4 * config.d_model and config.family in ("gpt2", "gpt_neo"):
        fields["n_inner" if config.family == "gpt2" else "intermediate_size"] = None
    return fields


def _rope_fields(config: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rotary_base}
    if config.rope_scaling is not None:
        rope.update((k, v) for k, v in vars(config.rope_scaling).items() if k == "rope_type" or v)
        if config.rope_scaling.rope_type == "linear":
            rope = {k: rope[k] for k in ("rope_type", "rope_theta", "factor")}
    if config.rotary_dim is not None and config.family == "gpt_neox":
        rope["partial_rotary_factor"] = config.rotary_dim / config.d_head
    return {"rope_parameters": rope}


def _gpt2_fields(config: ModelConfig) -> dict[str, Any]:
    if config.n_heads * config.d_head != config.d_model:
        raise ValueError(
            f"gpt2_config_dict: GPT-2 needs n_heads * d_head == d_model, got "
            f"{config.n_heads} * {config.d_head} != {config.d_model}"
        )
    return dict(
        scale_attn_weights=config.use_attn_scale,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
    )


def _gpt_neo_fields(config: ModelConfig) -> dict[str, Any]:
    kinds = list(config.attn_types or ("global",) * config.n_layers)
    return dict(attention_types=[[kinds, 1]], window_size=config.window_size or 256)


def _gpt_neox_fields(config: ModelConfig) -> dict[str, Any]:
    return dict(
        **_rope_fields(config),
        use_parallel_residual=config.parallel_attn_mlp,
        attention_bias=config.attn_qkv_bias,
    )


def _llama_fields(config: ModelConfig) -> dict[str, Any]:
    kinds = config.attn_types or ("global",) * config.n_layers
    fields = _rope_fields(config)
    fields["num_key_value_heads"] = config.n_kv_heads or config.n_heads
    if config.architecture == "LlamaForCausalLM":
        fields["attention_bias"] = config.attn_qkv_bias
    elif config.architecture == "MistralForCausalLM":
        fields["sliding_window"] = config.window_size if "local" in kinds else None
    else:  # Qwen2: the sliding layers are listed
        fields["layer_types"] = [
            "sliding_attention" if k == "local" else "full_attention" for k in kinds
        ]
        fields["use_sliding_window"] = "local" in kinds
        fields["max_window_layers"] = kinds.index("local") if "local" in kinds else len(kinds)
    return fields


#: family -> (transformers config class, the ModelConfig -> its fields).
_HF_CONFIGS: dict[str, tuple[dict[str, str], Callable[[ModelConfig], dict[str, Any]]]] = {
    "gpt2": ({"GPT2LMHeadModel": "GPT2Config"}, _gpt2_fields),
    "gpt_neo": ({"GPTNeoForCausalLM": "GPTNeoConfig"}, _gpt_neo_fields),
    "gpt_neox": ({"GPTNeoXForCausalLM": "GPTNeoXConfig"}, _gpt_neox_fields),
    "llama": (
        {
            "LlamaForCausalLM": "LlamaConfig",
            "MistralForCausalLM": "MistralConfig",
            "Qwen2ForCausalLM": "Qwen2Config",
        },
        _llama_fields,
    ),
}


def hf_config_dict(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` dict of the transformers model with ``config``'s architecture.

    Written for GPT-2, GPT-Neo, GPT-NeoX and the Llama layout (Llama, Mistral, Qwen2), each
    from the transformers config class of its architecture. Default BOS/EOS ids that
    lie outside a smaller vocabulary are dropped (``None``); dropout is 0 (lowrank's forward
    pass has none). The dict reads back (``config_from_hf``) as ``config`` exactly.

    Args:
        config: the model's :class:`ModelConfig`.
        extra: further fields of the transformers config (``bos_token_id``, ...).

    Raises:
        ValueError: an architecture without a writer, or a ``config`` that the architecture
            cannot express (the message names the first field that would differ).
    """
    import transformers

    if config.family not in _HF_CONFIGS:
        raise ValueError(f"hf_config_dict: writing {config.architecture} configs is not supported")
    classes, fields = _HF_CONFIGS[config.family]
    hf_class = getattr(transformers, classes[config.architecture])
    kwargs = {**_common_fields(config), **fields(config), **extra}
    hf = dict(
        hf_class(
            tie_word_embeddings=config.tie_word_embeddings,
            architectures=[config.architecture],
            **kwargs,
        ).to_dict()
    )
    _drop_foreign_token_ids(hf, config.d_vocab, set(extra))
    back = config_from_hf(hf)
    if back != config:
        wrong = next(k for k, v in vars(config).items() if getattr(back, k) != v)
        raise ValueError(
            f"hf_config_dict: {config.architecture} cannot express this config: "
            f"{wrong}={getattr(config, wrong)!r} would read back as {getattr(back, wrong)!r}"
        )
    return hf


def gpt2_config_dict(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` dict of a ``GPT2LMHeadModel`` (see :func:`hf_config_dict`)."""
    if config.family != "gpt2":
        raise ValueError(f"gpt2_config_dict: config is for {config.architecture}, not GPT-2")
    return hf_config_dict(config, **extra)


def llama_config_dict(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` dict of a Llama, Mistral or Qwen2 model (see :func:`hf_config_dict`)."""
    if config.family != "llama":
        raise ValueError(f"llama_config_dict: config is for {config.architecture}, not Llama")
    return hf_config_dict(config, **extra)


# ------------------------------------------------------------------ files
def _write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """``write(temporary name)`` beside ``path``, then rename it to ``path`` in one step."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _shard_bounds(nbytes: list[int], shards: int) -> list[int]:
    """Start index of each of ``shards`` contiguous groups of about equal bytes."""
    total, starts, seen = sum(nbytes), [0], 0
    for i, n in enumerate(nbytes):
        if len(starts) < shards and i > starts[-1] and seen >= total * len(starts) / shards:
            starts.append(i)
        seen += n
    return starts


def _save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _write_shards(entries: list[_Entry], out: Path, shards: int) -> list[str]:
    """Write ``entries`` as ``shards`` safetensors files (one in memory at a time)."""
    nbytes = [int(np.prod(shape)) * np.dtype(dt).itemsize for _, _, shape, dt in entries]
    starts = _shard_bounds(nbytes, shards)
    names = (
        [SAFETENSORS_FILE]
        if shards == 1
        else [f"model-{i + 1:05d}-of-{len(starts):05d}.safetensors" for i in range(len(starts))]
    )
    weight_map = {}
    for name, lo, hi in zip(names, starts, [*starts[1:], len(entries)], strict=True):
        tensors = {key: make() for key, make, _, _ in entries[lo:hi]}
        _write_atomic(out / name, functools.partial(_save_safetensors, tensors))
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if shards > 1:
        index = {"metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map}
        _write_text(out / SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
    stale = SAFETENSORS_FILE if shards > 1 else SAFETENSORS_INDEX  # the loader would read it
    (out / stale).unlink(missing_ok=True)
    return names


def save_pretrained(
    params: Params,
    config: ModelConfig,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    shards: int = 1,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (and the tokenizer) to ``directory``.

    The result loads with :func:`lowrank.models.load_pretrained` (the same tree, when loaded
    unprocessed in the same dtype) and with ``transformers.AutoModelForCausalLM``. Each file
    is written to a temporary name and renamed into place, so a reader never sees half a
    file; the weights are written before ``config.json``.

    Args:
        params: unprocessed canonical tree (see :func:`hf_state_dict`).
        config: its :class:`ModelConfig` (GPT-2, GPT-Neo, GPT-NeoX, Llama, Mistral, Qwen2).
        directory: created if missing; existing files of the same names are replaced (and a
            stale ``model.safetensors`` or shard index of the other form removed).
        tokenizer: a ``transformers`` tokenizer saved with its ``save_pretrained``; its BOS,
            EOS and PAD ids go into ``config.json``.
        shards: write this many ``model-0000i-of-0000n.safetensors`` files of about equal
            size and a ``model.safetensors.index.json`` (transformers' sharded form); only
            one shard's tensors are in memory at a time.

    Returns:
        The directory as a :class:`~pathlib.Path`.
    """
    if not (isinstance(shards, int) and shards >= 1):
        raise ValueError(f"save_pretrained: shards must be a positive integer, got {shards!r}")
    entries = _tensors(params, config)  # checks the tree before anything is written
    if shards > len(entries):
        raise ValueError(
            f"save_pretrained: shards={shards} but the checkpoint has {len(entries)} tensors"
        )
    extra = {}
    if tokenizer is not None:
        extra = {n: int(v) for n in _TOKEN_IDS if (v := getattr(tokenizer, n, None)) is not None}
    config_dict = hf_config_dict(config, **extra)
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(entries, out, shards)
    _write_text(out / CONFIG_FILE, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
