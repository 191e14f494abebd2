"""Test-wide JAX settings: float32 by default, strict dtype promotion, 8 CPU devices."""

import jax

# Must run before any JAX backend is initialised.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_dtype_promotion", "strict")


# --------------------------------------------------------------------------------------
# Small random GPT-2 / GPT-Neo checkpoints (lowrank.models tests). Heavy imports (torch,
# transformers, transformer_lens) happen inside the fixtures, so other tests stay fast.
import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TOKEN_SEQ = 17  # longer than the GPT-Neo window (5), shorter than n_ctx (24)
_WORDS = ["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(60)]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A saved random HF checkpoint and the torch model it came from."""

    family: str  # "gpt2" | "gpt_neo"
    path: Path
    hf_model: Any


def _randomise(model: Any, seed: int) -> None:
    """Non-trivial LayerNorm weights and biases, so that folding is exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".ln_" in name or "ln_f" in name:
                p.copy_((1.0 + 0.3 * noise) if name.endswith("weight") else 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="[UNK]",
    ).save_pretrained(path)


def build_gpt2(path: Path, seed: int = 0, **overrides: Any) -> Any:
    """Save a random GPT2LMHeadModel (safetensors) in ``path``; return the torch model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        n_layer=3,
        n_head=4,
        n_embd=32,
        vocab_size=101,
        n_positions=24,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**kwargs)).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    return model


def build_gpt_neo(path: Path, seed: int = 1, **overrides: Any) -> Any:
    """Save a random GPTNeoForCausalLM with global and local (window 5) layers."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        num_layers=4,
        num_heads=4,
        hidden_size=32,
        vocab_size=101,
        max_position_embeddings=24,
        attention_types=[[["global", "local"], 2]],
        window_size=5,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    model = GPTNeoForCausalLM(GPTNeoConfig(**kwargs)).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    path = tmp_path_factory.mktemp("gpt2")
    model = build_gpt2(path)
    _save_tokenizer(path)
    return Checkpoint("gpt2", path, model)


@pytest.fixture(scope="session")
def gpt_neo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    path = tmp_path_factory.mktemp("gpt_neo")
    return Checkpoint("gpt_neo", path, build_gpt_neo(path))


@pytest.fixture(scope="session", params=["gpt2", "gpt_neo"])
def checkpoint(request: pytest.FixtureRequest) -> Checkpoint:
    """Each family's checkpoint in turn."""
    return request.getfixturevalue(f"{request.param}_checkpoint")


@pytest.fixture(scope="session")
def tokens() -> np.ndarray:
    """Random token ids ``[2, TOKEN_SEQ]`` below the tiny models' vocabulary."""
    return np.random.default_rng(0).integers(0, 101, size=(2, TOKEN_SEQ)).astype(np.int32)


def hf_logits(ckpt: Checkpoint, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ckpt.hf_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def hf_numpy_state_dict(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in ckpt.hf_model.state_dict().items()}


def tl_config(ckpt: Checkpoint) -> Any:
    """A HookedTransformerConfig mirroring what TransformerLens derives from the HF config."""
    from transformer_lens import HookedTransformerConfig

    c = ckpt.hf_model.config
    if ckpt.family == "gpt2":
        d = dict(
            d_model=c.n_embd,
            d_head=c.n_embd // c.n_head,
            n_heads=c.n_head,
            d_mlp=4 * c.n_embd,
            n_layers=c.n_layer,
            n_ctx=c.n_positions,
            eps=c.layer_norm_epsilon,
            d_vocab=c.vocab_size,
            act_fn=c.activation_function,
            use_attn_scale=c.scale_attn_weights,
            use_local_attn=False,
            scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
            normalization_type="LN",
            original_architecture="GPT2LMHeadModel",
        )
    else:
        d = dict(
            d_model=c.hidden_size,
            d_head=c.hidden_size // c.num_heads,
            n_heads=c.num_heads,
            d_mlp=4 * c.hidden_size,
            n_layers=c.num_layers,
            n_ctx=c.max_position_embeddings,
            eps=c.layer_norm_epsilon,
            d_vocab=c.vocab_size,
            attn_types=c.attention_layers,
            act_fn=c.activation_function,
            use_attn_scale=False,
            use_local_attn=True,
            window_size=c.window_size,
            scale_attn_by_inverse_layer_idx=False,
            normalization_type="LN",
            original_architecture="GPTNeoForCausalLM",
        )
    return HookedTransformerConfig(**d, device="cpu", default_prepend_bos=False)


@pytest.fixture(scope="session")
def tl_model() -> Any:
    """Factory ``tl_model(ckpt, fold_ln, center_writing_weights, center_unembed,
    fold_value_biases, refactor=False)`` -> a processed TransformerLens HookedTransformer."""
    import warnings

    built: dict[tuple[Any, ...], Any] = {}

    def make(
        ckpt: Checkpoint,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor: bool = False,
    ) -> Any:
        key = (
            ckpt.family,
            fold_ln,
            center_writing_weights,
            center_unembed,
            fold_value_biases,
            refactor,
        )
        if key not in built:
            import torch
            from transformer_lens import HookedTransformer
            from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
            from transformer_lens.pretrained.weight_conversions.neo import convert_neo_weights

            cfg = tl_config(ckpt)
            convert = convert_gpt2_weights if ckpt.family == "gpt2" else convert_neo_weights
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state_dict = {k: v.clone() for k, v in convert(ckpt.hf_model, cfg).items()}
                model = HookedTransformer(cfg)
                model.load_and_process_state_dict(
                    state_dict,
                    fold_ln=fold_ln,
                    center_writing_weights=center_writing_weights,
                    center_unembed=center_unembed,
                    fold_value_biases=fold_value_biases,
                    refactor_factored_attn_matrices=refactor,
                )
            built[key] = model.eval()
        return built[key]

    return make


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"blocks.attn.W_Q": leaf, ...}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def canonical_shapes(
    n_layers: int,
    n_heads: int,
    d_model: int,
    d_head: int,
    d_mlp: int,
    d_vocab: int,
    n_ctx: int,
) -> dict[str, tuple[int, ...]]:
    """The documented tree layout, written out independently of lowrank's code."""
    L, H, d, dh, m, V = n_layers, n_heads, d_model, d_head, d_mlp, d_vocab
    return {
        "embed.W_E": (V, d),
        "pos_embed.W_pos": (n_ctx, d),
        "blocks.ln1.w": (L, d),
        "blocks.ln1.b": (L, d),
        "blocks.attn.W_Q": (L, H, d, dh),
        "blocks.attn.W_K": (L, H, d, dh),
        "blocks.attn.W_V": (L, H, d, dh),
        "blocks.attn.W_O": (L, H, dh, d),
        "blocks.attn.b_Q": (L, H, dh),
        "blocks.attn.b_K": (L, H, dh),
        "blocks.attn.b_V": (L, H, dh),
        "blocks.attn.b_O": (L, d),
        "blocks.ln2.w": (L, d),
        "blocks.ln2.b": (L, d),
        "blocks.mlp.W_in": (L, d, m),
        "blocks.mlp.b_in": (L, m),
        "blocks.mlp.W_out": (L, m, d),
        "blocks.mlp.b_out": (L, d),
        "ln_final.w": (d,),
        "ln_final.b": (d,),
        "unembed.W_U": (d, V),
        "unembed.b_U": (V,),
    }


def tl_stacked(tl_model: Any) -> dict[str, np.ndarray]:
    """A TransformerLens state dict in lowrank's flat layout (layers stacked)."""
    sd = {k: v.detach().numpy() for k, v in tl_model.state_dict().items()}
    n_layers = tl_model.cfg.n_layers
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if not key.startswith("blocks."):
            out[key] = value
            continue
        _, layer, rest = key.split(".", 2)
        if rest.endswith(("mask", "IGNORE")):
            continue
        if layer == "0":
            out["blocks." + rest] = np.stack([sd[f"blocks.{i}.{rest}"] for i in range(n_layers)])
    return out


# Published hyper-parameters (config.json on the hub), as HF writes them.
GPT2_FAMILY = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}
GPT_NEO_FAMILY = {
    "gpt-neo-125M": dict(num_layers=12, num_heads=12, hidden_size=768),
    "gpt-neo-1.3B": dict(num_layers=24, num_heads=16, hidden_size=2048),
    "gpt-neo-2.7B": dict(num_layers=32, num_heads=20, hidden_size=2560),
}


def published_config(name: str) -> dict:
    """The config.json dict of a published GPT-2 / GPT-Neo model."""
    if name in GPT2_FAMILY:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-05,
            "n_ctx": 1024,
            "n_positions": 1024,
            "vocab_size": 50257,
            **GPT2_FAMILY[name],
        }
    p = GPT_NEO_FAMILY[name]
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
        "attention_types": [[["global", "local"], p["num_layers"] // 2]],
        "max_position_embeddings": 2048,
        "window_size": 256,
        "vocab_size": 50257,
        "intermediate_size": None,
        **p,
    }
