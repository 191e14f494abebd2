"""The TransformerLens model that the ``forward`` op runs, for TransformerLens 3.x or 4.x.

The one place that switches on the installed TransformerLens (:func:`tl_major_version`):

* **TL 3.x**: a ``HookedTransformer`` whose config mirrors lowrank's and that loads lowrank's
  tree without weight processing (:func:`benchmarks.mirror.hooked_transformer`).
* **TL 4.x** has no ``HookedTransformer``: its users run a ``TransformerBridge`` around a
  Hugging Face model (``TransformerBridge.boot_transformers``). :func:`transformer_bridge`
  boots one around the float32 HF model (eager attention) that computes the same forward pass
  as lowrank's tree, and enables compatibility mode without weight processing:

  - Weights loaded from a checkpoint folder (``--checkpoint``, the embedded model): that
    folder's model. lowrank's tree is that checkpoint processed as TL's ``from_pretrained``
    (norms folded, writing weights and unembedding centred, value biases folded); these steps
    change the logits by at most a constant per position, which the log-softmax drops.
  - Any other tree (the random shapes): lowrank writes it as its family's HF state dict
    (:func:`lowrank.models.export.hf_state_dict`). A norm-folded tree (no ``ln1``, ``ln2``,
    ``ln_final``) is first given unit norms (:func:`with_unit_norms`): lowrank runs a folded
    tree's norms as TL's ``LNPre`` / ``RMSPre``, ``(x - mean(x)) / sqrt(var(x) + eps)`` and
    ``x / sqrt(mean(x^2) + eps)``, which is exactly LayerNorm / RMSNorm with weight ones and
    bias zeros. A tree that the export cannot write (a family it has no layout for, such as
    Gemma's, or a processed tree with a non-zero leaf that its checkpoints do not store, such
    as a folded GPT-2's unembedding bias) is :class:`~benchmarks.mirror.Unmirrorable`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from benchmarks.helpers import flatten, tl_major_version
from benchmarks.mirror import Unmirrorable, hooked_transformer

if TYPE_CHECKING:
    from benchmarks.shapes import Weights
    from lowrank.models import ModelConfig

__all__ = [
    "boot_bridge",
    "hf_model",
    "reference_kind",
    "reference_model",
    "tl_major_version",
    "transformer_bridge",
    "with_unit_norms",
]

#: Top-level subtrees and ``blocks`` subtrees of lowrank's tree that hold norm weights.
_NORMS = ("ln1", "ln2", "ln_final")


def reference_kind() -> str:
    """What the ``forward`` op runs on the TransformerLens side, for the results' notes."""
    if tl_major_version() < 4:
        return "HookedTransformer (mirrored config, lowrank's tree, no weight processing)"
    return "TransformerBridge (Hugging Face model of the same weights, no_processing=True)"


def reference_model(weights: Weights, device: str) -> Any:
    """The installed TransformerLens's model of ``weights``: ``model(tokens) -> logits``.

    Raises:
        Unmirrorable: TransformerLens cannot run the model as lowrank does.
    """
    if tl_major_version() < 4:
        return hooked_transformer(weights, device)
    return transformer_bridge(weights, device)


def transformer_bridge(weights: Weights, device: str) -> Any:
    """A TL 4 ``TransformerBridge`` around :func:`hf_model`, without weight processing.

    Raises:
        Unmirrorable: see :func:`hf_model`.
    """
    return boot_bridge(hf_model(weights), device)


def boot_bridge(model: Any, device: str = "cpu", **flags: bool) -> Any:
    """A TL 4 ``TransformerBridge`` around the Hugging Face causal LM ``model``.

    ``flags`` are ``enable_compatibility_mode``'s processing steps (``fold_ln``,
    ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``,
    ``refactor_factored_attn_matrices``); none true leaves the weights as they are. The tests
    build their TL 4 references with it too.
    """
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _save_tokenizer(folder)  # boot reloads the tokenizer from the name it is given
        bridge = TransformerBridge.boot_transformers(folder, hf_model=model, device=device)
        if any(flags.values()):
            bridge.enable_compatibility_mode(disable_warnings=True, **flags)
        else:
            bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return bridge.eval()


def hf_model(weights: Weights) -> Any:
    """The float32 Hugging Face causal LM (eager attention) with the forward pass of ``weights``.

    The checkpoint the tree was loaded from, else the tree written by lowrank's exporter.

    Raises:
        Unmirrorable: lowrank cannot write the tree as a Hugging Face state dict.
    """
    import torch
    import transformers

    options = dict(dtype=torch.float32, attn_implementation="eager")
    if weights.checkpoint is not None:
        auto = transformers.AutoModelForCausalLM
        return auto.from_pretrained(weights.checkpoint, **options).eval()
    state, config = _hf_state_dict(weights)
    from lowrank.models.export import hf_config_dict

    fields = hf_config_dict(config)
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, **options)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.float().eval()


def _hf_state_dict(weights: Weights) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """``weights`` (given unit norms if folded) as an HF state dict, and its config.

    The config unties the unembedding (the tree's ``W_U`` is written as ``lm_head.weight``).
    """
    from lowrank.models.export import hf_state_dict

    config = dataclasses.replace(weights.config, tie_word_embeddings=False)
    try:
        return hf_state_dict(with_unit_norms(weights.params, config), config), config
    except (ValueError, NotImplementedError) as err:
        raise Unmirrorable(
            f"TransformerLens {tl_major_version()} runs Hugging Face models, and lowrank cannot "
            f"write this {config.architecture} tree as one: {err}"
        ) from err


def with_unit_norms(params: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """``params`` with the norm leaves a folded tree lacks: weights ones, biases zeros.

    The result runs the same forward pass: a folded tree's norms are ``LNPre`` / ``RMSPre``,
    which are LayerNorm / RMSNorm with unit weight and zero bias. An unfolded tree is returned
    as it is. The norm leaves' shapes are those of lowrank's own ``init_params(config)``.
    """
    from lowrank.models import init_params

    layout = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    flat = flatten(params)
    for key, spec in flatten(layout).items():
        *_, norm, leaf = key.split(".")
        if key not in flat and norm in _NORMS:
            fill = np.ones if leaf == "w" else np.zeros
            flat[key] = fill(spec.shape, dtype=np.float32)
    return _nest(flat)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"blocks.attn.W_Q": leaf}`` -> nested dicts (the inverse of ``flatten``)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _save_tokenizer(folder: str) -> None:
    """Save a two-word tokenizer: the benchmarks feed token ids, but TL 4 loads a tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|endoftext|>": 1}
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="[UNK]",
    ).save_pretrained(folder)
