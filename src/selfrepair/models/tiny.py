"""Tiny random-weight models of each family (tests and fast notebook runs): transformers' own
config classes, nothing downloaded."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedArchitectureError
from .adapters import ADAPTERS

TINY_PREFIX = "tiny-"


# Each tiny model: its config class and the family's extra settings, chosen so that every
# mechanism its adapter names is exercised (biases where the family allows them, sliding windows
# shorter than a test's rows, multipliers and logit scales away from 1, project_in/out, experts).
def _llama_style(cls: str, head_dim: bool = True, **extra: Any):
    def make(T, dims: dict, n_kv: int | None, overrides: dict) -> Any:
        kw = dict(num_hidden_layers=dims["n_layers"], num_attention_heads=dims["n_heads"],
                  num_key_value_heads=n_kv or max(1, dims["n_heads"] // 2),
                  hidden_size=dims["d_model"], intermediate_size=dims["d_mlp"],
                  max_position_embeddings=dims["n_ctx"], **dims["common"])
        if head_dim:
            kw["head_dim"] = dims["d_head"]
        return getattr(T, cls)(**{**kw, **extra, **overrides})
    return make


def _gpt_style(cls: str, **extra: Any):
    def make(T, dims: dict, n_kv: int | None, overrides: dict) -> Any:
        kw = dict(n_layer=dims["n_layers"], n_head=dims["n_heads"], n_embd=dims["d_model"],
                  n_inner=dims["d_mlp"], n_positions=dims["n_ctx"], **dims["common"])
        return getattr(T, cls)(**{**kw, **extra, **overrides})
    return make


def _plain(cls: str, **extra: Any):
    """Config fields named by the family: a value that names a dimension takes it."""
    def make(T, dims: dict, n_kv: int | None, overrides: dict) -> Any:
        kw = {k: (dims[v] if isinstance(v, str) and v in dims else v) for k, v in extra.items()}
        return getattr(T, cls)(**{**kw, **dims["common"], **overrides})
    return make


_EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=32)
TINY: dict[str, Any] = {
    "mistral": _llama_style("MistralConfig", sliding_window=4),
    "qwen2": _llama_style("Qwen2Config", head_dim=False),
    "qwen3": _llama_style("Qwen3Config", attention_bias=True),
    "smollm3": _llama_style("SmolLM3Config", no_rope_layer_interval=2, attention_bias=True, mlp_bias=True),
    "gemma": _llama_style("GemmaConfig", num_key_value_heads=1),
    "gemma2": _llama_style("Gemma2Config", sliding_window=4, final_logit_softcapping=5.0,
                           attn_logit_softcapping=5.0, query_pre_attn_scalar=8),
    "olmo": _llama_style("OlmoConfig", head_dim=False, attention_bias=True),
    "olmo2": _llama_style("Olmo2Config", head_dim=False, attention_bias=True),
    "granite": _llama_style("GraniteConfig", head_dim=False, residual_multiplier=0.5,
                            embedding_multiplier=2.0, logits_scaling=4.0, attention_multiplier=0.3,
                            attention_bias=True, mlp_bias=True),
    "cohere": _llama_style("CohereConfig", head_dim=False, logit_scale=0.5, attention_bias=True),
    "phi": _llama_style("PhiConfig", head_dim=False, partial_rotary_factor=0.5),
    "phi3": _llama_style("Phi3Config", head_dim=False),
    "stablelm": _llama_style("StableLmConfig", head_dim=False, use_parallel_residual=True,
                             use_qkv_bias=True, partial_rotary_factor=0.5),
    "starcoder2": _llama_style("Starcoder2Config", head_dim=False, sliding_window=4, use_bias=True),
    "mixtral": _llama_style("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _llama_style("Qwen2MoeConfig", head_dim=False, num_experts=4, decoder_sparse_step=1,
                              shared_expert_intermediate_size=32, **_EXPERTS),
    "qwen3_moe": _llama_style("Qwen3MoeConfig", num_experts=4, decoder_sparse_step=1,
                              mlp_only_layers=[0], **_EXPERTS),
    "olmoe": _llama_style("OlmoeConfig", head_dim=False, num_experts=4, num_experts_per_tok=2),
    "gptj": _gpt_style("GPTJConfig", rotary_dim=4),
    "gpt_bigcode": _gpt_style("GPTBigCodeConfig", multi_query=True),
    "gpt_neo": _plain("GPTNeoConfig", num_layers="n_layers", num_heads="n_heads", hidden_size="d_model",
                      intermediate_size="d_mlp", max_position_embeddings="n_ctx", window_size=4,
                      attention_types=[[["global", "local"], 1]]),
    "opt": _plain("OPTConfig", num_hidden_layers="n_layers", num_attention_heads="n_heads",
                  hidden_size="d_model", ffn_dim="d_mlp", max_position_embeddings="n_ctx",
                  word_embed_proj_dim=16),
    "bloom": _plain("BloomConfig", n_layer="n_layers", n_head="n_heads", hidden_size="d_model"),
    "falcon": _plain("FalconConfig", num_hidden_layers="n_layers", num_attention_heads="n_heads",
                     hidden_size="d_model", ffn_hidden_size="d_mlp", max_position_embeddings="n_ctx",
                     new_decoder_architecture=True, num_kv_heads=2, bias=True),
}


def tiny_names() -> list[str]:
    """One tiny model per supported model type (``"tiny-<name>"``), in registry order."""
    alias = {"gemma3_text": "gemma3", "gemma3": None}  # the multimodal gemma3 has no tiny model
    names = [alias.get(t, t) for a in ADAPTERS.values() for t in a.model_types]
    return list(dict.fromkeys(n for n in names if n is not None))


def tiny_config(family: str, *, n_layers: int = 2, n_heads: int = 4, d_head: int = 8,
                d_mlp: int = 64, d_vocab: int = 259, n_ctx: int = 128,
                parallel_residual: bool = True, n_kv_heads: int | None = None, **overrides: Any) -> Any:
    """A small config of one family (random weights need no download); ``overrides`` set any
    field of the family's config class (e.g. ``alibi=True`` for falcon)."""
    import transformers as T

    d_model = n_heads * d_head
    # initializer_range 0.15 (HF: 0.02) gives tiny models logits and effects of order 1
    common = dict(vocab_size=d_vocab, bos_token_id=256, eos_token_id=257, pad_token_id=258,
                  initializer_range=0.15)
    if family == "gpt2":
        config = T.GPT2Config(n_layer=n_layers, n_head=n_heads, n_embd=d_model, n_inner=d_mlp,
                              n_positions=n_ctx, **common)
    elif family == "gpt_neox":
        config = T.GPTNeoXConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                 hidden_size=d_model, intermediate_size=d_mlp,
                                 max_position_embeddings=n_ctx, use_parallel_residual=parallel_residual,
                                 **common)
    elif family == "llama":
        config = T.LlamaConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               num_key_value_heads=n_kv_heads or max(1, n_heads // 2),
                               hidden_size=d_model, intermediate_size=d_mlp,
                               max_position_embeddings=n_ctx, **common)
    elif family == "gemma3":
        # head_dim deliberately != d_model / n_heads, as in the real Gemma-3 (256 vs 640 / 4)
        config = T.Gemma3TextConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                    num_key_value_heads=n_kv_heads or 1, head_dim=d_head * 2,
                                    hidden_size=d_model, intermediate_size=d_mlp,
                                    max_position_embeddings=n_ctx, sliding_window=16, **common)
    elif family in TINY:
        dims = dict(n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_model=d_model, d_mlp=d_mlp,
                    n_ctx=n_ctx, common=common)
        return TINY[family](T, dims, n_kv_heads, overrides)
    else:
        raise UnsupportedArchitectureError(
            f"no tiny model for family {family!r}: use one of {', '.join(tiny_names())}")
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               weight_scale: float | None = None, **config_kw: Any) -> torch.nn.Module:
    """A random-weight causal LM of ``family`` built from :func:`tiny_config`.

    Norm gains and biases are randomised too (HF initialises them to 1/0, Gemma's gains to 0),
    so tests exercise every term of the linearised norms rather than an identity.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_kw)
    with torch.random.fork_rng(devices=[]):  # HF initialises from the global RNG: leave it as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
            elif weight_scale is not None:
                p.mul_(weight_scale)
    return model.to(dtype).eval()


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + <bos>, <eos>, <pad>) matching tiny models' vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")

