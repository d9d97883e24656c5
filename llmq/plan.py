"""Memory planning from the config alone: weight bytes, the peak of each quantization mode, and the budget.

Parameters are counted on a meta-device skeleton (accelerate `init_empty_weights`), so every family
transformers knows works and nothing is downloaded beyond config.json. With d = bytes per element of the
dtype, L = calibration seq_len, n = calibration windows, h = hidden size, I = intermediate size:

- INT8 weights: 1 byte per weight of every linear outside the skip list + a 4-byte scale per output row;
  every other parameter (embeddings, norms, biases, skipped head) stays at d.
- calibration working set of one window through one layer: L * (4h + 3I) * d + heads * L^2 * d (attention
  scores, the eager/math upper bound); the in-memory forward also makes the logits, L * vocab * d.
- in-memory peak (llmq.run): the float model + the larger of that working set and one linear's
  conversion (its fp16 copy + int8) + the stage's working set (below); on CPU plus the memory-mapped
  checkpoint pages resident while from_pretrained copies them (~ the float model again) and the auto-alpha
  row samples of one layer (auto_tokens x in_features float32 per group). With auto alpha the guard
  (llmq/guard.py) holds the auto model and the best rival so far beside the one being built: + 2 x int8
  (the float reference's logits go to a temporary file). `--max-kl` (llmq/guard.py `keep_sensitive_`) adds
  a float copy of every converted linear (what it can put back), the float reference, and its float32
  log-probabilities on the ranking windows (rank_windows * L * vocab * 4: 0.2 GB for SmolLM2, 1.1 GB for
  Gemma 3's 262k vocabulary).
- sequential peak (llmq.sequential) on the device: the n * L * h * d calibration hidden states + one
  window's working set + the larger of (the non-layer weights but the head, and layer 0, which the catcher
  runs once, while the layer inputs are caught) and (the largest float layer + its int8 copy + the
  stage's working set, in the layer loop); on CPU + the layer as read from the shards. Without GPTQ,
  llm-int8 / weight-only alpha 0 do not calibrate: one layer, float + int8. On a GPU, CPU memory holds a
  layer in transit, or the non-layer weights but the head while the inputs are caught
  (`sequential_host_bytes`); at the end non-layer tensors are copied file to file or cast ~8 MiB at a
  time; only non-layer linears converted to int8 (lm_head when not skipped) are loaded, float + int8.
- the stage's working set (`_stage_bytes`, both modes): GPTQ's Hessians, its copy of one layer's
  linears, and the larger of the largest linear's GPTQ working set (`gptq.working_bytes`: 10.1 GiB for
  a down_proj with 28672 inputs) and the alpha search's copy of the layer.
These are estimates (allocator slack, CUDA context and Python are not counted): leave ~20% headroom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .budget import detected_budget, main_device_key
from .config import rescales
from .errors import ConfigError, LlmqError

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Plan:
    """What quantizing a model takes, in bytes; `fits_*` compare the peaks with `budget_bytes` (None:
    no budget given, everything fits)."""

    model: str
    model_type: str
    method: str
    dtype: str
    calib_samples: int
    calib_seq_len: int
    params: int
    layers: int
    fp_weight_bytes: int
    int8_weight_bytes: int
    largest_layer_bytes: int
    non_layer_bytes: int
    head_bytes: int
    hidden_states_bytes: int
    activation_bytes: int
    in_memory_peak_bytes: int
    sequential_peak_bytes: int
    sequential_host_bytes: int
    device: str
    budget_bytes: int | None
    host_budget_bytes: int | None
    fits_in_memory: bool
    fits_sequential: bool
    sequential_supported: bool = True  # False for inputs sequential mode cannot read (GGUF, .bin only)
    stage_bytes: int = 0  # the per-layer stage's working set, in both peaks (`_stage_bytes`)
    gptq: bool = True  # whether GPTQ's part is in it


def _config(config_or_model_id: Any, trust_remote_code: bool):
    """(name, config, whether sequential mode can read the weights)."""
    from pathlib import Path

    from .load import check_causal, load_config, source

    readable = True
    if isinstance(config_or_model_id, str):
        name, config = config_or_model_id, load_config(config_or_model_id, trust_remote_code)
        src = source(name)
        folder = Path(src["pretrained_model_name_or_path"])
        has = {f.suffix for f in folder.glob("*.*")} if src["kind"] == "folder" else set()
        # a config-only folder (planning before a download) counts as readable; weights must be safetensors
        readable = src["kind"] != "gguf" and not (".bin" in has and ".safetensors" not in has)
    else:
        config = config_or_model_id
        name = getattr(config, "_name_or_path", "") or config.model_type
    check_causal(config, name)
    return name, config, readable


def estimate(config_or_model_id: Any, *, method: str, dtype: str = "float16", calib_samples: int,
             calib_seq_len: int, max_memory: dict | None = None, alpha: float | str = "auto",
             auto_tokens: int = 512, skip: tuple[str, ...] = ("lm_head",), max_kl: float | None = None,
             rank_windows: int = 2, gptq: bool = True, trust_remote_code: bool = False) -> Plan:
    """Estimate weight bytes and the peak memory of the in-memory and sequential modes from the config."""
    from .arch import ARCHS, layers_path
    from .config import METHODS
    from .load import skeleton
    from .quantize import linear_names
    from .smooth import linear_weight, smooth_targets

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    gpus = sorted(k for k in (max_memory or {}) if isinstance(k, int))
    key = (gpus[0] if gpus else "cpu") if max_memory else main_device_key()
    if dtype == "auto":
        dtype = "float16" if key != "cpu" else "float32"
    if dtype not in _BYTES:
        raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    name, config, readable = _config(config_or_model_id, trust_remote_code)
    model = skeleton(config, trust_remote_code=trust_remote_code)
    d = _BYTES[dtype]
    path = layers_path(model)
    n_layers = len(model.get_submodule(path))
    rows = {f"{n}.weight": linear_weight(model.get_submodule(n)).shape[0] for n in linear_names(model, skip)}
    layer_fp, layer_q = [0] * n_layers, [0] * n_layers
    fp = q = params = outer = 0  # outer: the linears outside the layers that are converted, float + int8
    for pname, p in model.named_parameters():  # tied parameters are listed once
        b = p.numel() * d
        bq = p.numel() + 4 * rows[pname] if pname in rows else b  # int8 + one float32 scale per row
        params, fp, q = params + p.numel(), fp + b, q + bq
        if pname.startswith(path + "."):
            i = int(pname[len(path) + 1:].split(".")[0])
            layer_fp[i] += b
            layer_q[i] += bq
        elif pname in rows:
            outer += b + bq
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_b = 0 if head is None or tied else head.weight.numel() * d
    text = config.get_text_config()
    h, inter = text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    L, n = calib_seq_len, calib_samples
    calibrates = rescales(method, alpha)
    auto = calibrates and alpha == "auto"  # the alpha search, its row samples and (in memory) the guard
    windows = calibrates or gptq  # calibration windows pass through the layers (GPTQ: its Hessians)
    targets = smooth_targets(model) if calibrates and (method == "smoothquant" or config.model_type in ARCHS) else []
    stage = _stage_bytes(model, path, rows, targets, max(layer_fp), gptq, auto, d)
    heads = getattr(text, "num_attention_heads", None) or 1  # (none in Mamba, RWKV: no attention scores)
    act = L * (4 * h + 3 * inter) * d + heads * L * L * d
    logits = L * text.vocab_size * d
    biggest_linear = max((model.get_parameter(k).numel() for k in rows), default=0) * 3  # fp16 copy + int8
    samples = 0
    if auto:  # float32 rows kept per smoothing group of one layer (layer by layer)
        for t in targets:
            samples += auto_tokens * linear_weight(model.get_submodule(t.linear_names[0])).shape[1] * 4
        samples //= max(n_layers, 1)
    in_memory = fp + max(act + logits if windows else 0, biggest_linear) + stage
    if auto:  # the guard: the auto model and the best rival beside the one being built
        in_memory += 2 * q
    if max_kl is not None:  # --max-kl: float linears to put back, the reference, its ranking log-probs
        lin_fp = sum(model.get_parameter(k).numel() for k in rows) * d
        in_memory += lin_fp + fp + rank_windows * L * text.vocab_size * 4
    if key == "cpu":  # while from_pretrained copies weights out of the memory-mapped checkpoint, both are resident
        in_memory += fp + samples
    non_layer = fp - sum(layer_fp)
    # smoothquant alpha 0 without GPTQ needs no maxima: only window 0 passes, for the fp16 range check
    hidden = (n if gptq or alpha == "auto" or float(alpha) != 0 else 1) * L * h * d if windows else 0
    big = max(range(n_layers), key=lambda i: layer_fp[i] + layer_q[i])
    # catching the layer inputs needs the non-layer weights but the head, and layer 0; the layer loop one
    # layer, in float and int8, and the stage's working set; both hold the hidden states. Without
    # calibration windows only the layer loop runs.
    loop = layer_fp[big] + layer_q[big] + stage
    phase = max(non_layer - head_b + layer_fp[0], loop) if windows else loop
    seq_device = phase + (hidden + act + L * h * d if windows else 0)
    # on CPU: the non-layer weights but an untied head while the layer inputs are caught (loaded there first),
    # a layer on its way to the GPU, and at the end the non-layer linears that are converted (the other
    # non-layer tensors are cast a piece at a time on their way out: llmq/sequential.py `_write_outside`)
    seq_host = max(layer_fp[big], non_layer - head_b if windows else 0, outer)
    if key == "cpu":  # the layer as read from the checkpoint, beside its copy in the run dtype
        seq_device = max(seq_device + layer_fp[big], seq_host)
    budget = max_memory.get(key) if max_memory else None
    host_budget = max_memory.get("cpu") if max_memory and key != "cpu" else None
    return Plan(
        model=name, model_type=config.model_type, method=method, dtype=dtype, calib_samples=n,
        calib_seq_len=L, params=params, layers=n_layers, fp_weight_bytes=fp, int8_weight_bytes=q,
        largest_layer_bytes=layer_fp[big], non_layer_bytes=non_layer, head_bytes=head_b,
        hidden_states_bytes=hidden, activation_bytes=act + (logits if calibrates else 0),
        in_memory_peak_bytes=in_memory, sequential_peak_bytes=seq_device,
        sequential_host_bytes=seq_host if key != "cpu" else seq_device,
        device="cpu" if key == "cpu" else f"cuda:{key}", budget_bytes=budget, host_budget_bytes=host_budget,
        fits_in_memory=budget is None or in_memory <= budget,
        fits_sequential=(budget is None or seq_device <= budget)
        and (host_budget is None or seq_host <= host_budget),
        sequential_supported=readable, stage_bytes=stage, gptq=gptq,
    )


def _stage_bytes(model, path: str, rows: dict[str, int], targets, layer_bytes: int, gptq: bool, search: bool,
                 d: int) -> int:
    """What llmq/stage.py holds beside one layer's weights (the largest over layers): GPTQ's float32 input
    Hessians (one per smoothing group, else per linear), a copy of the layer's linears in their own dtype of
    `d` bytes (`before`) and the largest linear's own working set (one float64 [in, in] matrix factored and
    inverted in place, then its float32 U; then the permuted H, U and a few copies of W:
    `gptq.working_bytes`); or, at another time, the alpha search's copy of the layer (`base`) and its largest
    group's stacked weights (docs/large-models.md)."""
    from .gptq import working_bytes
    from .smooth import linear_weight

    key = {n: t.key for t in targets for n in t.linear_names}
    layers: dict[str, dict[str, tuple[int, int]]] = {}  # layer index -> its linears' [out, in]
    for k in rows:
        if k.startswith(path + "."):
            n = k.removesuffix(".weight")
            layers.setdefault(n[len(path) + 1:].split(".")[0], {})[n] = linear_weight(model.get_submodule(n)).shape
    most = 0
    for shapes in layers.values():
        hess = {key.get(n, n): c * c * 4 for n, (_, c) in shapes.items()}  # [in, in] per distinct input
        sweep = max((working_bytes(r, c) for r, c in shapes.values()), default=0)
        group = max((sum(r * c for n, (r, c) in shapes.items() if key.get(n) == t.key) * 4 for t in targets),
                    default=0)
        work = layer_bytes + group if search else 0
        if gptq and shapes:
            work = sum(hess.values()) + sum(r * c for r, c in shapes.values()) * d + max(sweep, work)
        most = max(most, work)
    return most


def should_run_sequential(plan: Plan) -> bool:
    """True when the in-memory mode does not fit the budget but the sequential one does."""
    return not plan.fits_in_memory and plan.fits_sequential and plan.sequential_supported


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def format_plan(plan: Plan) -> str:
    """A small table: sizes, then each mode's estimated peak against the budget."""
    yes = {True: "yes", False: "NO"}
    calib = (f", calibration {plan.calib_samples} x {plan.calib_seq_len}" if plan.method == "smoothquant" else "")
    rows = [
        ("model", f"{plan.model} ({plan.model_type}, {plan.params / 1e9:.2f}B params, {plan.layers} layers)"),
        ("method", f"{plan.method}, {plan.dtype}{calib}"),
        (f"FP weights ({plan.dtype})", _gib(plan.fp_weight_bytes)),
        ("INT8 weights", f"{_gib(plan.int8_weight_bytes)} ({plan.int8_weight_bytes / plan.fp_weight_bytes:.2f}x)"),
        ("largest layer (FP)", _gib(plan.largest_layer_bytes)),
        ("embeddings + head + norms", _gib(plan.non_layer_bytes)),
        ("calibration hidden states", _gib(plan.hidden_states_bytes)),
        ("per-layer working set", f"{_gib(plan.stage_bytes)} ({'GPTQ' if plan.gptq else 'no GPTQ'}; in both peaks)"),
        (f"budget ({plan.device})", _gib(plan.budget_bytes) if plan.budget_bytes is not None else "none given"),
        ("in-memory peak", f"{_gib(plan.in_memory_peak_bytes)}  fits: {yes[plan.fits_in_memory]}"),
        ("sequential peak", f"{_gib(plan.sequential_peak_bytes)}  fits: {yes[plan.fits_sequential]}"
                            + ("" if plan.sequential_supported else " (needs a safetensors checkpoint)")),
    ]
    if plan.device != "cpu":
        rows.append(("sequential CPU memory",
                     f"{_gib(plan.sequential_host_bytes)} (the non-layer weights but the head, or a layer in transit)"))
    width = max(len(k) for k, _ in rows)
    mode = ("sequential (in-memory does not fit)" if should_run_sequential(plan)
            else "in-memory" if plan.fits_in_memory
            else "in-memory does not fit; sequential would, from a safetensors checkpoint" if plan.fits_sequential
            else "neither fits the budget" + (" (--no-gptq needs less)" if plan.gptq and plan.stage_bytes else ""))
    return "\n".join([*(f"{k.ljust(width)}  {v}" for k, v in rows), f"{'mode'.ljust(width)}  {mode}"])


def choose_mode(recipe: Any, max_memory: dict | None, *, asked: bool = False,
                evaluate: bool = False) -> tuple[bool, str]:
    """(sequential?, why) for `llmq quantize`: sequential when asked, or when the estimate says the in-memory
    mode does not fit `max_memory` (default: what is free now) and the sequential one does."""
    why = "--sequential given"
    if not asked:
        cal, sm = recipe.calibration, recipe.smoothing
        try:
            plan = estimate(recipe.model, method=recipe.quantization.method, dtype=recipe.dtype,
                            calib_samples=cal.samples, calib_seq_len=cal.seq_len,
                            max_memory=max_memory or detected_budget(), alpha=sm.alpha,
                            auto_tokens=sm.auto_tokens, skip=recipe.quantization.skip,
                            max_kl=recipe.quantization.max_kl, rank_windows=recipe.quantization.rank_windows,
                            gptq=recipe.quantization.gptq, trust_remote_code=recipe.trust_remote_code)
        except LlmqError as e:
            # the estimate is advisory: the in-memory run reports user errors (bad config...) with its own
            # message; anything else is a bug in the estimate and surfaces as one
            return False, f"in-memory (no memory estimate for this model: {str(e).splitlines()[0][:200]})"
        need = (f"in-memory needs ~{_gib(plan.in_memory_peak_bytes)}, sequential ~"
                f"{_gib(plan.sequential_peak_bytes)}, budget {_gib(plan.budget_bytes)} on {plan.device}")
        if not should_run_sequential(plan):
            fits = ("in-memory fits" if plan.fits_in_memory
                    else "sequential mode needs a safetensors checkpoint" if not plan.sequential_supported
                    else "neither fits; --sequential needs less" + (", --no-gptq less still" if plan.gptq else ""))
            return False, f"in-memory ({need}; {fits})"
        why = f"sequential ({need})"
    if recipe.quantization.rotate is True:  # auto: off in sequential mode (llmq/rotate.py auto_rotate)
        raise ConfigError("--rotate rotates the embedding, every layer and lm_head of the whole model, which "
                          f"sequential mode ({why}) never holds at once; drop --rotate, or --sequential, or "
                          "raise --max-memory")
    if evaluate:
        raise ConfigError("--eval needs the float and INT8 models in memory together, which sequential mode "
                          "avoids; quantize without --eval, then run `llmq eval OUT --max-memory ...`")
    return True, why
