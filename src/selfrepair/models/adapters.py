"""The architecture registry: one declarative :class:`Adapter` per model family.

An adapter says where a family keeps the pieces the paper's quantities need and how they combine:
the blocks, which module's *input* is the per-head attention output before the output projection
(``z``), which module's output is the MLP's write and whose input its neurons, the norms (in front
of attention and MLP, on their outputs, the final one) with their kind and gain, the unembedding,
and the family's transforms between them (parallel residual, multipliers on the writes, logit
scales and soft-capping). Code reads a model only through :class:`selfrepair.models.Model`, which
applies its adapter; a family whose mechanism no field describes needs code where that field is
read (:mod:`selfrepair.models.sites`, :mod:`selfrepair.models.model`).

``load_model`` checks every adapter against the model it wraps (:mod:`selfrepair.models.check`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps the pieces the paper's quantities need.

    Paths are dotted attribute paths; those of a block's parts are relative to the block.
    """

    family: str
    model_types: tuple[str, ...]
    note: str  # what this family does differently (``selfrepair models``, the API appendix)
    blocks: str = "model.layers"  # ModuleList of decoder blocks
    attn: str = "self_attn"  # attention module (its attention_interface call, or its output[1]: the pattern)
    attn_out: str = "self_attn.o_proj"  # output projection; its INPUT is z = concat_h z_h
    mlp: str = "mlp"  # its OUTPUT is the MLP's write before any post-norm or multiplier
    mlp_out: str | None = "mlp.down_proj"  # its INPUT is the neuron activations; None: experts (MoE)
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    norm: str = "rmsnorm"  # "layernorm" (centres) | "rmsnorm"
    gain: str = "w"  # "w" | "1+w" (Gemma) | "none" (OLMo's norm has no parameters)
    eps: float | None = None  # the norms' epsilon when the module stores none (OLMo: 1e-5)
    attn_norm: str | None = "input_layernorm"  # norm in front of attention; None: it reads the residual
    mlp_norm: str | None = "post_attention_layernorm"  # norm in front of the MLP (= attn_norm: shared)
    post_attn_norm: str | None = None  # norm on the attention's output before the residual add
    post_mlp_norm: str | None = None  # norm on the MLP's output before the residual add
    parallel: bool | str = False  # attention and MLP read the same residual (or: the config flag)
    conv1d: bool = False  # GPT-2 Conv1D stores weights [in, out]; nn.Linear stores [out, in]
    block_tuple: bool = False  # the block returns (hidden states, attention weights)
    pattern: str = "interface"  # "interface": eager attention on the attention_interface call's
    #   inputs; "output": the attention module's output[1] (families with their own eager code);
    #   "sdpa:<call>": softmax(q k^T / sqrt(d) + mask) from that scaled_dot_product_attention call
    flat_mlp: bool = False  # the MLP runs on [batch * pos, d] (OPT)
    mlp_inplace: bool = False  # the block adds into the MLP's output tensor in place: reads copy it
    write_scale: str | None = None  # config attribute multiplying every write to the residual
    logit_scale: str | None = None  # config attribute multiplying the logits ("1/attr": dividing)
    logit_softcap: str | None = None  # config attribute: logits = c tanh(logits / c), after the measured logit
    unembed_in: str | None = None  # bias-free linear map between the final norm and the unembedding
    value: str | None = "self_attn.v_proj"  # the module whose bias holds the value bias b_V
    value_layout: str = "separate"  # b_V in that bias: "separate" (all of it), "qkv" ([q | k | v]),
    #   "per_head" ([q k v] per head), "grouped" ([q.. k v] per kv head: Falcon's new decoder)
    moe: bool = False  # the MLP is a mixture of experts: its write is taken whole
    variants: tuple[tuple[dict, dict], ...] = ()  # (config values, field overrides), all that match
    refuse: tuple[tuple[str, Any, str], ...] = ()  # (config attribute, value, why it is refused)

    def resolve(self, config: Any) -> "Adapter":
        """This adapter for one model: its variants applied, refused configurations refused."""
        for attr, value, why in self.refuse:
            if getattr(config, attr, None) == value:
                raise UnsupportedArchitectureError(
                    f"{config.model_type} with {attr}={value!r} is not supported: {why}")
        out = self
        for when, fields in self.variants:
            if all(getattr(config, k, None) == v for k, v in when.items()):
                out = dataclasses.replace(out, **fields)
        return dataclasses.replace(out, variants=())

    def is_parallel(self, config: Any) -> bool:
        return bool(getattr(config, self.parallel, False)) if isinstance(self.parallel, str) else self.parallel


_GPT_STYLE = dict(blocks="transformer.h", final_norm="transformer.ln_f", norm="layernorm",
                  attn_norm="ln_1", mlp_norm="ln_2")
_MOE = dict(mlp_out=None, moe=True)
_SDPA = "torch_nn_functional_scaled_dot_product_attention"  # Falcon's own calls (rotary: _0, ALiBi: _1)

ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in (
        Adapter("gpt2", ("gpt2",), "Conv1D weights stored [in, out]; fused c_attn [q | k | v]",
                attn="attn", attn_out="attn.c_proj", mlp_out="mlp.c_proj", conv1d=True,
                value="attn.c_attn", value_layout="qkv", **_GPT_STYLE),
        Adapter("gpt_neox", ("gpt_neox",), "parallel residual from two norms when "
                "use_parallel_residual (Pythia); fused query_key_value per head",
                blocks="gpt_neox.layers", attn="attention", attn_out="attention.dense",
                mlp_out="mlp.dense_4h_to_h", final_norm="gpt_neox.final_layer_norm", norm="layernorm",
                parallel="use_parallel_residual", value="attention.query_key_value", value_layout="per_head"),
        Adapter("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3"),
                "the reference layout (RMSNorm, pre-norm, grouped-query attention); qwen3 normalizes "
                "queries and keys per head, mistral and qwen2 may use sliding windows, smollm3 "
                "leaves rotary out of every fourth layer (NoPE): all inside attention"),
        Adapter("gemma", ("gemma",), "RMSNorm gain 1 + w; embeddings scaled by sqrt(d_model)",
                gain="1+w"),
        Adapter("gemma2", ("gemma2",), "sandwich norms (on each write as well as in front), "
                "gain 1 + w, alternating sliding-window layers, attention soft-capping; the final "
                "logits are soft-capped c tanh(x / c): the measured logit is x, before the cap",
                gain="1+w", mlp_norm="pre_feedforward_layernorm",
                post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
                logit_softcap="final_logit_softcapping"),
        Adapter("gemma3", ("gemma3_text", "gemma3"), "sandwich norms, gain 1 + w, local and "
                "global layers, q/k norms", gain="1+w", mlp_norm="pre_feedforward_layernorm",
                post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm"),
        Adapter("olmo", ("olmo",), "LayerNorm without gain or bias (no parameters, eps 1e-5)",
                norm="layernorm", gain="none", eps=1e-5),
        Adapter("olmo2", ("olmo2",), "norms on the outputs only: attention and MLP read the "
                "residual itself and each write is RMS-normalized before it is added",
                attn_norm=None, mlp_norm=None, post_attn_norm="post_attention_layernorm",
                post_mlp_norm="post_feedforward_layernorm"),
        Adapter("granite", ("granite",), "every write to the residual multiplied by "
                "residual_multiplier, the embedding by embedding_multiplier, the logits divided by "
                "logits_scaling", write_scale="residual_multiplier", logit_scale="1/logits_scaling"),
        Adapter("cohere", ("cohere",), "parallel attention and MLP from one LayerNorm without "
                "bias; logits multiplied by logit_scale", norm="layernorm", mlp_norm="input_layernorm",
                parallel=True, logit_scale="logit_scale"),
        Adapter("phi", ("phi",), "parallel attention and MLP from one LayerNorm; output "
                "projection 'dense'; biases everywhere, the unembedding's included",
                attn_out="self_attn.dense", mlp_out="mlp.fc2", final_norm="model.final_layernorm",
                norm="layernorm", mlp_norm="input_layernorm", parallel=True),
        Adapter("phi3", ("phi3",), "fused qkv_proj [q | k | v] and gate_up_proj",
                value="self_attn.qkv_proj", value_layout="qkv"),
        Adapter("stablelm", ("stablelm",), "LayerNorm; parallel attention and MLP from one norm "
                "when use_parallel_residual", norm="layernorm", parallel="use_parallel_residual",
                variants=(({"use_parallel_residual": True}, {"mlp_norm": "input_layernorm"}),)),
        Adapter("starcoder2", ("starcoder2",), "LayerNorm; biases on every projection (the output "
                "projection's included) when use_bias; sliding window", mlp_out="mlp.c_proj",
                norm="layernorm"),
        Adapter("gptj", ("gptj",), "parallel attention and MLP from one LayerNorm; biased "
                "unembedding; attention computed by the family's own code (pattern: its output)",
                attn="attn", attn_out="attn.out_proj", mlp_out="mlp.fc_out", parallel=True,
                block_tuple=True, pattern="output", value="attn.v_proj", **{**_GPT_STYLE, "mlp_norm": "ln_1"}),
        Adapter("gpt_neo", ("gpt_neo",), "alternating global and local (windowed) attention, "
                "unscaled attention scores, a biased output projection",
                attn="attn.attention", attn_out="attn.attention.out_proj", mlp_out="mlp.c_proj",
                block_tuple=True, pattern="output", value="attn.attention.v_proj", **_GPT_STYLE),
        Adapter("opt", ("opt",), "the MLP has no module of its own (fc1 -> act -> fc2 on the "
                "block, over flattened positions); project_in / project_out between the residual "
                "and a smaller embedding; only pre-LN OPT", blocks="model.decoder.layers",
                attn_out="self_attn.out_proj", mlp="fc2", mlp_out="fc2",
                final_norm="model.decoder.final_layer_norm", norm="layernorm",
                attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", flat_mlp=True,
                unembed_in="model.decoder.project_out",
                refuse=(("do_layer_norm_before", False, "post-LN OPT (e.g. OPT-350m) normalizes the "
                         "residual stream after every block, so no write reaches the logits through "
                         "one final norm that a clean run can freeze: its components have no direct "
                         "effect in the paper's sense"),
                        ("_remove_final_layer_norm", True, "without a final norm the library's "
                         "readout of the residual stream does not apply"))),
        Adapter("bloom", ("bloom",), "ALiBi; LayerNorm on the embeddings; fused query_key_value "
                "per head; attention and MLP add the residual inside their modules, so their "
                "writes are the dense projections' outputs", attn="self_attention",
                attn_out="self_attention.dense", mlp="mlp.dense_4h_to_h", mlp_out="mlp.dense_4h_to_h",
                blocks="transformer.h", final_norm="transformer.ln_f", norm="layernorm",
                block_tuple=True, pattern="output", value="self_attention.query_key_value",
                value_layout="per_head",
                refuse=(("apply_residual_connection_post_layernorm", True, "the residual stream "
                         "is replaced by the normalized one in every block, so earlier writes do not "
                         "reach the logits unchanged"),)),
        Adapter("falcon", ("falcon",), "parallel attention and MLP from one norm (Falcon-7B) or "
                "two (new decoder architecture); multi-query or grouped fused query_key_value; "
                "rotary or ALiBi", blocks="transformer.h", attn="self_attention",
                attn_out="self_attention.dense", mlp_out="mlp.dense_4h_to_h",
                final_norm="transformer.ln_f", norm="layernorm", parallel="parallel_attn",
                block_tuple=True, pattern=f"sdpa:{_SDPA}_0", mlp_inplace=True,
                value="self_attention.query_key_value", value_layout="per_head",
                variants=(({"alibi": True}, {"pattern": f"sdpa:{_SDPA}_1"}),
                          ({"_attn_implementation": "eager"}, {"pattern": "output"}),
                          ({"parallel_attn": True}, {"mlp_norm": "input_layernorm"}),
                          ({"multi_query": True}, {"value_layout": "qkv"}),
                          ({"new_decoder_architecture": True}, {"value_layout": "grouped"}),
                          ({"new_decoder_architecture": True, "num_ln_in_parallel_attn": 2},
                           {"attn_norm": "ln_attn", "mlp_norm": "ln_mlp"}))),
        Adapter("gpt_bigcode", ("gpt_bigcode",), "multi-query attention with a fused c_attn "
                "[q | k | v] (per head without multi_query)", attn="attn", attn_out="attn.c_proj",
                mlp_out="mlp.c_proj", value="attn.c_attn", value_layout="qkv",
                variants=(({"multi_query": False}, {"value_layout": "per_head"}),), **_GPT_STYLE),
        Adapter("mixtral", ("mixtral",), "mixture-of-experts MLP (top-k routed experts): its "
                "write is taken whole, it has no neurons of its own", **_MOE),
        Adapter("qwen2_moe", ("qwen2_moe",), "mixture-of-experts MLP with a gated shared expert, "
                "taken whole", **_MOE),
        Adapter("qwen3_moe", ("qwen3_moe",), "mixture-of-experts MLP taken whole; q/k norms",
                **_MOE),
        Adapter("olmoe", ("olmoe",), "mixture-of-experts MLP taken whole; q/k norms over all "
                "heads", **_MOE),
    )
}
SUPPORTED_MODEL_TYPES = sorted(t for a in ADAPTERS.values() for t in a.model_types)


LIMITS = (
    "Every model is checked when it loads (selfrepair/adapter_check.py): the heads sum to the "
    "attention output, the writes to each block's output, the direct effects and biases to the "
    "logit; a failing piece is named instead of measured.",
    "A model type outside this list is tried with each family whose module layout it has and used "
    "with the first whose load-time check passes (a warning names it).",
    "Post-LN models are refused (OPT with do_layer_norm_before=False, e.g. OPT-350m; BLOOM with "
    "apply_residual_connection_post_layernorm): no write reaches the logits through one final norm.",
    "Mixture-of-experts MLPs (mixtral, qwen2_moe, qwen3_moe, olmoe) are taken whole; the neurons "
    "chapter refuses them. In float64 their experts run with transformers' eager implementation "
    "(grouped_mm has no float64 kernel).",
    "Gemma-2's soft-capped logits: the measured logit is the centered logit before the cap (the "
    "linear quantity eq. 2 sums to); self_repair also returns delta_logit_capped, after it.",
    "Norms that compute in float32 inside a float64 model (Hugging Face's RMSNorm, OLMo's and "
    "Cohere's LayerNorm) bound a float64 comparison at ~1e-7 instead of ~1e-15.",
    "Falcon with ALiBi: transformers' eager and sdpa attention disagree (~0.1 in a tiny model's "
    "logits); the library measures the implementation the model was loaded with.",
)


def families_text() -> str:
    """``selfrepair models``: every family, its model types and what its adapter does differently,
    then the known limits."""
    lines = ["Supported model types, by family (what each adapter does differently):", ""]
    for a in ADAPTERS.values():
        lines.append(f"  {a.family:<12} {', '.join(a.model_types)}")
        lines.append(f"  {'':<12} {a.note}")
    lines += ["", "Known limits:", ""] + [f"  - {text}" for text in LIMITS]
    return "\n".join(lines)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a Hugging Face ``config.model_type``; one clear error otherwise."""
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported. Supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (`selfrepair models` lists what each family does "
        "differently). A model whose modules match one of these families' layout is tried with "
        "that adapter when it loads; otherwise add an Adapter in selfrepair/models/adapters.py.")


def _paths(adapter: Adapter) -> list[str]:
    """The block-relative paths an adapter needs to find in a block."""
    return [p for p in (adapter.attn, adapter.attn_out, adapter.mlp, adapter.mlp_out,
                        adapter.attn_norm, adapter.mlp_norm, adapter.post_attn_norm,
                        adapter.post_mlp_norm) if p is not None]


def has_path(root: Any, path: str) -> bool:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() and hasattr(root, "__getitem__") else getattr(root, part, None)
        if root is None:
            return False
    return True


def layout_matches(hf: Any) -> list[Adapter]:
    """The adapters (registry order) whose every module path exists in ``hf`` — for a model type
    not in the registry (a fine-tune under a new name); the load-time check decides among them."""
    out = []
    for adapter in ADAPTERS.values():
        if adapter.refuse and any(getattr(hf.config, a, None) == v for a, v, _ in adapter.refuse):
            continue
        a = adapter.resolve(hf.config)
        if not all(has_path(hf, p) for p in (a.blocks, a.final_norm, a.unembed)):
            continue
        blocks = get_path(hf, a.blocks)
        if len(blocks) and all(has_path(blocks[0], p) for p in _paths(a)):
            out.append(adapter)
    return out


def get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root
