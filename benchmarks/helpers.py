"""Helpers shared by the benchmarks and the tests: GPT-2 configs, tree layouts, TL versions.

The one home of what both sides need to build a model and its TransformerLens (TL) twin. The
tests import it as ``benchmarks.helpers`` (pytest puts the repository root on ``sys.path``);
it imports neither lowrank, torch nor TransformerLens at module level.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lowrank.models import ModelConfig


_LLAMA_3_1_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
#: Published ``config.json`` dicts of the Llama-3.1 sizes (the tests' abstract shapes, the pod
#: plans).
LLAMA_3_1: dict[str, dict[str, Any]] = {
    "Llama-3.1-8B": {
        **_LLAMA_3_1_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
    },
    "Llama-3.1-70B": {
        **_LLAMA_3_1_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
    },
    "Llama-3.1-405B": {
        **_LLAMA_3_1_COMMON,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_attention_heads": 128,
        "num_hidden_layers": 126,
        "num_key_value_heads": 8,
    },
}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpt2_config(n_layers: int, n_heads: int, d_model: int, **overrides: Any) -> ModelConfig:
    """A GPT-2 ``ModelConfig`` with GPT-2's ratios, vocabulary and context.

    ``d_head = d_model / n_heads``, ``d_mlp = 4 d_model``, 50257 tokens, 1024 positions,
    unless ``overrides`` (any ``ModelConfig`` fields) say otherwise.
    """
    from lowrank.models import ModelConfig

    fields: dict[str, Any] = dict(
        architecture="GPT2LMHeadModel",
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=50257,
        n_ctx=1024,
    )
    fields.update(overrides)
    return ModelConfig(n_layers=n_layers, n_heads=n_heads, d_model=d_model, **fields)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"blocks.attn.W_Q": leaf, ...}``, in the dicts' order."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unstack_layers(flat: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Split the stacked ``blocks.x [L, ...]`` into TL's per-layer ``blocks.{l}.x``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("blocks."):
            rest = key[len("blocks.") :]
            out.update({f"blocks.{i}.{rest}": value[i] for i in range(n_layers)})
        else:
            out[key] = value
    return out


def stack_layers(state: dict[str, Any], n_layers: int) -> dict[str, np.ndarray]:
    """Stack TL's per-layer ``blocks.{l}.x`` into ``blocks.x [L, ...]``; other keys stay."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not key.startswith("blocks."):
            out[key] = value
        elif key.startswith("blocks.0."):
            rest = key[len("blocks.0.") :]
            out["blocks." + rest] = np.stack([state[f"blocks.{i}.{rest}"] for i in range(n_layers)])
    return out


def tl_major_version() -> int:
    """The major version of the installed TransformerLens (3 for 3.9, 4 for 4.x).

    Read from the distribution's metadata, without importing TransformerLens. Which TL model
    the benchmarks compare against depends on it: see :mod:`benchmarks.tl_reference`.

    Raises:
        importlib.metadata.PackageNotFoundError: TransformerLens is not installed.
    """
    return int(metadata.version("transformer-lens").split(".")[0])


def hooked_config(fields: dict[str, Any], device: str = "cpu") -> Any:
    """A TL ``HookedTransformerConfig`` of ``fields`` on ``device``, prepending no BOS token.

    TransformerLens 3.x only (4.x has no ``HookedTransformerConfig``).
    """
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**fields, device=device, default_prepend_bos=False)
