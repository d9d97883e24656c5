"""THE architecture table: per model family, which module feeds which linears in a decoder layer.

The only place in llmq that knows model families. Adding a family = one `ARCHS` entry + a tiny config in
tests/test_smooth.py, where smoothing must leave that family's logits unchanged.

A `Group` names modules relative to one decoder layer. `prev` is the module whose output channels are
divided by the smoothing scales s; `linears` are the consumers whose input channels are multiplied by s.
Exactness rules that decide what may appear here (see llmq/smooth.py for the formula):

- "attn" / "mlp": a norm whose output feeds ONLY the listed linears. Post-LN layouts (OPT-350m,
  BLOOM with apply_residual_connection_post_layernorm) also send the norm output into the residual
  stream, so they are excluded with `when`. Where one norm feeds both attention and MLP (parallel
  attention), one "attn" group lists the MLP input among its linears.
- "v_o": v's output channels reach o's input channels unchanged (attention mixes tokens, not channels).
  Only where v's rows are contiguous: separate v_proj, or the TAIL rows of a fused [q|k|v] projection
  (Phi3, GPT-2). Skipped for per-head interleaved qkv (GPT-NeoX, BLOOM): exact in principle, but needs an
  index map we do not test.
- "up_down": down's input is act(gate(x)) * up(x), so dividing up's rows divides down's input exactly.
  Not for ungated MLPs (fc1 -> act -> fc2): the activation is in between.

`NO_INT8`: families no llmq method converts. Stock transformers' bitsandbytes loader rebuilds only modules
whose type is exactly nn.Linear, or Conv1D (transformers/integrations/bitsandbytes.py,
`replace_with_bnb_linear`), so a family built from nn.Linear subclasses would reload in float.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import WITHOUT_LAYER_STAGE, UnsupportedArchitecture


@dataclass(frozen=True)
class Group:
    """One smoothing group of a decoder layer; module names are relative to the layer."""

    name: str  # "attn" | "mlp" | "v_o" | "up_down" (llmq.config.GROUPS)
    prev: str
    linears: tuple[str, ...]
    prev_kind: str = "norm"  # "norm": w/s, b/s; "gemma_norm": output = norm(x) * (1 + w); "linear": rows/s
    tail: bool = False  # prev is fused; only its LAST rows (v of [q|k|v], up of [gate|up]) feed the linears
    when: tuple[tuple[str, Any], ...] = ()  # (text-config attribute, required value) pairs
    optional: bool = False  # hybrid families: only in the layers that have linears[0] (LFM2 attention vs conv)
    partial: bool = False  # linears a layer lacks are left out (Gemma 4: KV-shared layers have q_proj alone)


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    groups: tuple[Group, ...]  # applied in this order within each layer
    alpha: float = 0.5  # the family's published (or customary) alpha: configs/<family>.yaml, the guard's rival

    def active_groups(self, config: Any) -> tuple[Group, ...]:
        """The groups whose `when` conditions hold for this (text) config."""
        return tuple(g for g in self.groups if all(getattr(config, k, None) == v for k, v in g.when))


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_V_O = Group("v_o", "self_attn.v_proj", ("self_attn.o_proj",), "linear")
_UP_DOWN = Group("up_down", "mlp.up_proj", ("mlp.down_proj",), "linear")
_V_O_OPTIONAL = replace(_V_O, optional=True)  # hybrids: only in the attention layers
_FF_UP_DOWN = Group("up_down", "feed_forward.up_proj", ("feed_forward.down_proj",), "linear")  # falcon_h1, bamba


def _llama_like(layers: str = "model.layers", norm: str = "norm", mlp_norm: str = "post_attention_layernorm",
                alpha: float = 0.8) -> Arch:
    return Arch(layers, (
        Group("attn", "input_layernorm", _QKV, norm),
        _V_O,
        Group("mlp", mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), norm),
        _UP_DOWN,
    ), alpha)


def _ungated(attn_norm: str, mlp_norm: str, up: str, alpha: float = 0.8) -> Arch:
    """q/k/v after one norm, v -> o, and an MLP up -> activation -> down (no up -> down pair)."""
    return Arch("model.layers", (Group("attn", attn_norm, _QKV), _V_O, Group("mlp", mlp_norm, (up,))), alpha)


_GEMMA2 = _llama_like(norm="gemma_norm", mlp_norm="pre_feedforward_layernorm")  # post_* norms stay untouched
# Gemma 4: plain-weight norms; KV-shared layers have q_proj alone, attention_k_eq_v layers no v_proj (v is k's
# output); no v -> o (v_norm renormalises each head of v); the per-layer-input gate reads the residual stream
_GEMMA4 = ((Group("attn", "input_layernorm", _QKV, partial=True),
            Group("mlp", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _UP_DOWN), 0.8)
_LFM_CONV_MLP = (  # LFM2 / LFM3: the short convolution's in_proj, then w2(silu(w1 x) * w3 x)
    Group("attn", "operator_norm", ("conv.in_proj",), optional=True),
    Group("mlp", "ffn_norm", ("feed_forward.w1", "feed_forward.w3")),
    Group("up_down", "feed_forward.w3", ("feed_forward.w2",), "linear"),
)
_OPT_PRE_LN = (("do_layer_norm_before", True), ("layer_norm_elementwise_affine", True))
_GLM = Arch("model.layers", (  # q/k/v apart, MLP fused [gate|up] as in phi3; glm4's post-norms stay untouched
    Group("attn", "input_layernorm", _QKV),
    _V_O,
    Group("mlp", "post_attention_layernorm", ("mlp.gate_up_proj",)),
    Group("up_down", "mlp.gate_up_proj", ("mlp.down_proj",), "linear", tail=True),
), 0.8)

ARCHS: dict[str, Arch] = {
    "llama": _llama_like(alpha=0.85),
    "mistral": _llama_like(),
    "qwen2": _llama_like(alpha=0.85),
    "qwen3": _llama_like(alpha=0.85),
    "gemma": _llama_like(norm="gemma_norm"),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gemma3": _llama_like("model.language_model.layers", "gemma_norm", "pre_feedforward_layernorm"),
    "smollm3": _llama_like(),
    **dict.fromkeys(("cwm", "exaone", "hunyuan_v1_dense", "internlm3", "iquestcoder", "ministral", "ministral3"),
                    _llama_like()),
    "hyperclovax": _llama_like(),  # its optional post-norms (use_post_norm) stay untouched
    "vaultgemma": _GEMMA2,
    "gemma4_text": Arch("model.layers", *_GEMMA4),
    "gemma4": Arch("model.language_model.layers", *_GEMMA4),
    **dict.fromkeys(("granite", "granite_swa"), _llama_like()),  # scalar multipliers commute with smoothing
    "diffllama": Arch("model.layers", (  # differential attention renormalises each head's output: no v -> o
        Group("attn", "input_layernorm", _QKV),
        Group("mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _UP_DOWN,
    ), 0.8),
    "helium": _llama_like(),
    "ernie4_5": _llama_like(),
    "seed_oss": _llama_like(),
    "glm": _GLM,
    "glm4": _GLM,
    # no norm before the sublayers (OLMo 2/3, EXAONE 4 normalise outputs; OLMo's LayerNorm has no weights):
    # only the linear -> linear pairs; OLMo's optional clip_qkv clamps v, which a scale does not pass through
    **dict.fromkeys(("olmo", "olmo2", "olmo3", "exaone4"), Arch("model.layers", (
        Group("v_o", "self_attn.v_proj", ("self_attn.o_proj",), "linear", when=(("clip_qkv", None),)),
        _UP_DOWN,
    ), 0.8)),
    "nanochat": Arch("model.layers", (_V_O,), 0.8),  # weightless norms, ungated MLP: only v -> o
    "arcee": _ungated("input_layernorm", "post_attention_layernorm", "mlp.up_proj"),  # up -> relu^2 -> down
    **dict.fromkeys(("apertus", "apertus1p5_text"),  # up -> xIELU -> down
                    _ungated("attention_layernorm", "feedforward_layernorm", "mlp.up_proj")),
    "stablelm": Arch("model.layers", (  # LayerNorm (weight and bias); parallel: one norm feeds attn and MLP
        Group("attn", "input_layernorm", _QKV, when=(("use_parallel_residual", False),)),
        Group("attn", "input_layernorm", (*_QKV, "mlp.gate_proj", "mlp.up_proj"),
              when=(("use_parallel_residual", True),)),
        _V_O,
        Group("mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"),
              when=(("use_parallel_residual", False),)),
        _UP_DOWN,
    )),
    **dict.fromkeys(("cohere", "cohere2"), Arch("model.layers", (  # parallel: one bias-free LayerNorm feeds both
        Group("attn", "input_layernorm", (*_QKV, "mlp.gate_proj", "mlp.up_proj")), _V_O, _UP_DOWN,
    ))),
    "nemotron": Arch("model.layers", (  # LayerNorm1P: weight + 1 (as Gemma) and a bias; ungated relu^2 MLP
        Group("attn", "input_layernorm", _QKV, "gemma_norm"), _V_O,
        Group("mlp", "post_attention_layernorm", ("mlp.up_proj",), "gemma_norm"),
    ), 0.5),
    "jais2": _ungated("input_layernorm", "post_attention_layernorm", "mlp.up_proj", 0.5),  # LayerNorm, relu^2
    # hybrid, (1 + w) norms: input_layernorm feeds gated attention (q_proj also makes the output gate, which
    # multiplies o_proj's input per channel, so v -> o stays exact) or the gated delta net's four projections
    **dict.fromkeys(("qwen3_5", "qwen3_5_text"), Arch("model.layers", (
        Group("attn", "input_layernorm", _QKV, "gemma_norm", optional=True),
        _V_O_OPTIONAL,
        Group("attn", "input_layernorm", tuple(f"linear_attn.in_proj_{x}" for x in ("qkv", "z", "b", "a")),
              "gemma_norm", optional=True),
        Group("mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "gemma_norm"),
        _UP_DOWN,
    ), 0.8)),
    "falcon_h1": Arch("model.layers", (  # parallel hybrid: one norm feeds attention and mamba (scalar multipliers)
        Group("attn", "input_layernorm", (*_QKV, "mamba.in_proj")), _V_O,
        Group("mlp", "pre_ff_layernorm", ("feed_forward.gate_proj", "feed_forward.up_proj")),
        _FF_UP_DOWN,
    ), 0.8),
    "bamba": Arch("model.layers", (  # hybrid: attention or mamba per layer
        Group("attn", "input_layernorm", _QKV, optional=True),
        _V_O_OPTIONAL,
        Group("attn", "input_layernorm", ("mamba.in_proj",), optional=True),
        Group("mlp", "pre_ff_layernorm", ("feed_forward.gate_proj", "feed_forward.up_proj")),
        _FF_UP_DOWN,
    ), 0.8),
    "lfm2": Arch("model.layers", (  # hybrid: each layer has attention or a short convolution after operator_norm
        Group("attn", "operator_norm", _QKV, optional=True),
        Group("v_o", "self_attn.v_proj", ("self_attn.out_proj",), "linear", optional=True), *_LFM_CONV_MLP,
    ), 0.8),
    "lfm3": Arch("model.layers", (  # as lfm2, with o_proj, optional sandwich norms (untouched) and an optional
        Group("attn", "operator_norm", (*_QKV, "self_attn.g_proj"), optional=True, partial=True),  # per-head gate
        _V_O_OPTIONAL, *_LFM_CONV_MLP,  # sigmoid(g_proj) scales each head's output: v -> o stays exact
    ), 0.8),
    "phi": Arch("model.layers", (  # parallel: one LayerNorm feeds q/k/v and fc1 -> gelu -> fc2
        Group("attn", "input_layernorm", (*_QKV, "mlp.fc1")),
        Group("v_o", "self_attn.v_proj", ("self_attn.dense",), "linear"),
    )),
    "gptj": Arch("transformer.h", (  # parallel, as phi
        Group("attn", "ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),
        Group("v_o", "attn.v_proj", ("attn.out_proj",), "linear"),
    )),
    "codegen": Arch("transformer.h", (  # parallel; qkv_proj interleaves q/v/k per model-parallel shard: no v_o
        Group("attn", "ln_1", ("attn.qkv_proj", "mlp.fc_in")),
    )),
    "gpt_neo": Arch("transformer.h", (
        Group("attn", "ln_1", tuple(f"attn.attention.{x}_proj" for x in "qkv")),
        Group("v_o", "attn.attention.v_proj", ("attn.attention.out_proj",), "linear"),
        Group("mlp", "ln_2", ("mlp.c_fc",)),
    )),
    "gpt_bigcode": Arch("transformer.h", (  # multi-query c_attn = [q | k | v], v one head shared by all heads;
        Group("attn", "ln_1", ("attn.c_attn",)),  # without multi_query it is per-head interleaved: no v_o
        Group("v_o", "attn.c_attn", ("attn.c_proj",), "linear", tail=True, when=(("multi_query", True),)),
        Group("mlp", "ln_2", ("mlp.c_fc",)),
    )),
    # Wqkv's optional clip_qkv clamps v, which a scale does not pass through: no v_o
    "mpt": Arch("transformer.blocks", (
        Group("attn", "norm_1", ("attn.Wqkv",)), Group("mlp", "norm_2", ("ffn.up_proj",)),
    )),
    "persimmon": Arch("model.layers", (  # query_key_value is per-head interleaved (as gpt_neox): no v_o
        Group("attn", "input_layernorm", ("self_attn.query_key_value",)),
        Group("mlp", "post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    )),
    **{mt: Arch(layers, (  # pre-LN, as OPT
        Group("attn", "self_attn_layer_norm", _QKV),
        Group("v_o", "self_attn.v_proj", ("self_attn.out_proj",), "linear"),
        Group("mlp", "final_layer_norm", ("fc1",)),
    )) for mt, layers in (("xglm", "model.layers"), ("biogpt", "biogpt.layers"))},
    "starcoder2": _ungated("input_layernorm", "post_attention_layernorm", "mlp.c_fc", 0.5),  # LayerNorm, gelu
    "phi3": Arch("model.layers", (
        Group("attn", "input_layernorm", ("self_attn.qkv_proj",)),
        Group("v_o", "self_attn.qkv_proj", ("self_attn.o_proj",), "linear", tail=True),
        Group("mlp", "post_attention_layernorm", ("mlp.gate_up_proj",)),
        Group("up_down", "mlp.gate_up_proj", ("mlp.down_proj",), "linear", tail=True),
    ), 0.8),
    "opt": Arch("model.decoder.layers", (
        Group("attn", "self_attn_layer_norm", _QKV, when=_OPT_PRE_LN),
        Group("v_o", "self_attn.v_proj", ("self_attn.out_proj",), "linear"),
        Group("mlp", "final_layer_norm", ("fc1",), when=_OPT_PRE_LN),
    )),
    "gpt2": Arch("transformer.h", (
        Group("attn", "ln_1", ("attn.c_attn",)),
        Group("v_o", "attn.c_attn", ("attn.c_proj",), "linear", tail=True),
        Group("mlp", "ln_2", ("mlp.c_fc",)),
    )),
    "gpt_neox": Arch("gpt_neox.layers", (  # same wiring with and without use_parallel_residual
        Group("attn", "input_layernorm", ("attention.query_key_value",)),
        Group("mlp", "post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    )),
    "bloom": Arch("transformer.h", (
        Group("attn", "input_layernorm", ("self_attention.query_key_value",),
              when=(("apply_residual_connection_post_layernorm", False),)),
        Group("mlp", "post_attention_layernorm", ("mlp.dense_h_to_4h",),
              when=(("apply_residual_connection_post_layernorm", False),)),
    )),
}


NO_INT8: dict[str, str] = {  # model_type -> its nn.Linear subclass
    "falcon": "FalconLinear",
}


def check_int8_supported(model_type: str | None) -> None:
    """Raise UnsupportedArchitecture for a family in NO_INT8: no method can make a checkpoint of it that
    stock transformers reloads as int8."""
    if model_type in NO_INT8:
        raise UnsupportedArchitecture(
            f"llmq cannot quantize {model_type!r} models: their projections are {NO_INT8[model_type]}, which "
            "transformers' bitsandbytes loader does not rebuild as int8 (it takes exact nn.Linear only), so "
            "no method gives a checkpoint that stock from_pretrained reloads; keep this model in 16-bit")


def supported_model_types() -> list[str]:
    return sorted(ARCHS)


def get_arch(model_type: str) -> Arch:
    """The table entry for a `config.model_type`; raises UnsupportedArchitecture for unknown families."""
    check_int8_supported(model_type)
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"SmoothQuant has no table entry for model type {model_type!r}; supported: "
            f"{', '.join(supported_model_types())}. Use --method llm-int8 or --method weight-only, "
            "which need no table entry."
        ) from None


def layers_path(model: Any) -> str:
    """The dotted path of the decoder layers' ModuleList: the table's entry, else the largest ModuleList with
    as many entries as the config has decoder layers (num_hidden_layers; decoder_layers where a causal decoder
    comes from an encoder-decoder config, as BlenderBot's): llm-int8 / weight-only work outside the table."""
    from torch import nn

    arch = ARCHS.get(model.config.model_type)
    if arch is not None:
        return arch.layers
    cfg = model.config.get_text_config()
    counts = {getattr(cfg, k, None) for k in ("num_hidden_layers", "decoder_layers")} - {None}
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) in counts]
    if not lists:
        raise UnsupportedArchitecture(
            f"cannot find the {cfg.num_hidden_layers} decoder layers of this {model.config.model_type} model, "
            f"which GPTQ, smoothing, --max-kl and --sequential work through one by one; {WITHOUT_LAYER_STAGE}")
    return max(lists)[1]
