"""TransformerLens as the tests' reference, whichever major version is installed.

TransformerLens 3.9 (CI's Python 3.11 run) builds a ``HookedTransformer`` from its own
``convert_*_weights`` of the HF model and ``load_and_process_state_dict``; 4.x (Python 3.12+)
removed both: a ``TransformerBridge`` wraps the HF model (``boot_transformers``) and
``enable_compatibility_mode`` processes its weights as ``HookedTransformer`` did. Both models
answer ``.OV``, ``.QK``, ``.W_E``, ``.W_U``, ``all_composition_scores`` and ``SVDInterpreter``;
:func:`weights` reads either's parameters in lowrank's flat layout (layers stacked), so the
parity tests compare one thing whichever is installed. The 3.9 side lives in ``conftest.py``
(its configs); this module is the switch and the 4.x side.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np

from benchmarks.helpers import stack_layers, tl_major_version
from benchmarks.tl_reference import boot_bridge

TL4 = tl_major_version() >= 4
"""Whether the installed TransformerLens is 4.x (``TransformerBridge``) rather than 3.x."""

#: Grouped-query leaves that TransformerLens 4 repeats per query head in ``tl_parameters``.
_KV_LEAVES = ("attn.W_K", "attn.W_V", "attn.b_K", "attn.b_V")
#: Architectures whose TransformerLens 4 parameters are HF's, not 3.9's (:func:`_as_hooked_gemma`).
_GEMMA = ("GemmaForCausalLM", "Gemma2ForCausalLM")
#: Norm leaves that 4.x keeps (as ones and zeros) after folding, and 3.9 drops.
_FOLDED_NORMS = ("blocks.ln1.", "blocks.ln2.", "ln_final.")
#: Gemma-2's post-norms (never folded), which 4.x's ``tl_parameters`` leaves out.
_POST_NORM = re.compile(r"blocks\.\d+\.ln[12]_post\.weight")


def bridge(hf_model: Any, **flags: bool) -> Any:
    """A TransformerLens 4 bridge of a copy of ``hf_model`` processed by ``flags``
    (``enable_compatibility_mode``'s; none true leaves the weights as stored).
    """
    model = boot_bridge(copy.deepcopy(hf_model), **flags)
    model.lowrank_ln_folded = bool(flags.get("fold_ln"))
    return model


def weights(model: Any) -> dict[str, np.ndarray]:
    """A TransformerLens model's weights in lowrank's flat layout (layers stacked).

    3.x: the state dict (grouped ``_W_K`` as ``W_K``; masks and rotary tables left out). 4.x:
    ``tl_parameters()`` (and Gemma-2's post-norms, which it leaves out) with the repeated
    key/value heads taken once per group (the copies checked equal) and, once folded, the
    norms left out (checked to be ones and zeros).
    """
    if not TL4:
        skip = ("mask", "IGNORE", "rotary_sin", "rotary_cos")
        state = {
            k.replace("._", "."): v.detach().numpy()
            for k, v in model.state_dict().items()
            if not k.endswith(skip)
        }
        return stack_layers(state, model.cfg.n_layers)
    params = {k: v.detach().numpy() for k, v in model.tl_parameters().items()}
    for key, value in model.state_dict().items():
        if _POST_NORM.fullmatch(key):
            params[key.removesuffix("weight") + "w"] = value.detach().numpy()
    flat = stack_layers(params, model.cfg.n_layers)
    if model.cfg.architecture in _GEMMA:
        _as_hooked_gemma(flat, model.cfg.d_model)
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    for key in [k for k in flat if k.endswith(_KV_LEAVES)]:
        flat[key] = _one_per_group(flat[key], n_kv, key)
    if getattr(model, "lowrank_ln_folded", False):
        for key in [k for k in flat if k.startswith(_FOLDED_NORMS)]:
            value = flat.pop(key)
            unit = 1.0 if key.endswith(".w") else 0.0
            np.testing.assert_array_equal(value, np.full_like(value, unit), err_msg=key)
    return flat


def _as_hooked_gemma(flat: dict[str, np.ndarray], d_model: int) -> None:
    """TransformerLens 4 keeps HF's Gemma parameters (the forward scales the embedding by
    ``sqrt(d_model)``; norms multiply by ``1 + w``); 3.9, and lowrank, store the scaled ``W_E``
    and ``1 + w``: rewrite ``flat`` so (float32, as 3.9's conversion computes them).
    """
    flat["embed.W_E"] = flat["embed.W_E"] * np.float32(d_model**0.5)
    for key in [k for k in flat if k.startswith(("blocks.ln", "ln_final.")) and k.endswith(".w")]:
        flat[key] = flat[key] + np.float32(1.0)


def _one_per_group(x: np.ndarray, n_kv: int, key: str) -> np.ndarray:
    """``[L, H, ...]`` repeated per query head -> ``[L, n_kv, ...]`` (copies checked equal)."""
    grouped = x.reshape(x.shape[0], n_kv, x.shape[1] // n_kv, *x.shape[2:])
    for member in range(1, grouped.shape[2]):
        np.testing.assert_array_equal(grouped[:, :, member], grouped[:, :, 0], err_msg=key)
    return grouped[:, :, 0]
