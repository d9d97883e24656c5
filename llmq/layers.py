"""Layer by layer: catch every decoder layer's inputs per calibration window (recorders stand in for the
layers and stop the forward after the last one: the GPTQ / llm-compressor "catcher"), run one layer alone on
those cached inputs (`Feed`, which llmq/stage.py drives like a model, by names relative to the model), and
the layer loop both drivers run (`quantize_layers_`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .memory import trim_heap


class _Caught(Exception):
    """Raised by the last recorder: the layer inputs of this window are recorded, stop the forward."""


class _Recorder(nn.Module):
    """Stands in for decoder layer `idx`: records its inputs and hands the model's loop what the real layer 0
    returned on the first window (`out`, shared by all recorders), so the loop unpacks or indexes it as it
    does a real layer's output (BLOOM's `outputs[0]`, Bamba's two values, RWKV's three, GPT-1's lists)."""

    def __init__(self, idx: int, inner: nn.Module, sink: list, last: bool, out: list) -> None:
        super().__init__()
        self._inner, self.idx, self.sink, self.last, self._out = [inner], idx, sink, last, out

    def __getattr__(self, name: str) -> Any:  # attributes the model's loop reads (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_inner":
                raise
            return getattr(self._inner[0], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink[self.idx] = (hidden if self.idx == 0 else None, args[1:], kwargs)
        if self.last:
            raise _Caught
        if not self._out:  # the next recorder ignores its input; only the output's structure matters
            self._out.append(self._inner[0](hidden, *args[1:], **kwargs))
        return self._out[0]


def _run_to_last(model: nn.Module, ids: torch.Tensor) -> None:
    try:
        model(ids, use_cache=False)
    except _Caught:
        pass


def catch_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, device: torch.device,
                 store: torch.device) -> tuple[list[torch.Tensor], list[list]]:
    """Per window: layer 0's hidden states (kept on `store`), and every layer's other args/kwargs, as
    extras[layer][window]. The model runs each window as llmq.calibrate runs it."""
    n = len(layers)
    hidden: list[torch.Tensor] = []
    extras: list[list] = [[] for _ in range(n)]
    originals = list(layers)
    sink: list = [None] * n
    out: list = []
    for i in range(n):
        layers[i] = _Recorder(i, originals[i], sink, last=i == n - 1, out=out)
    try:
        with torch.inference_mode():
            for w in range(windows.shape[0]):
                _run_to_last(model, windows[w:w + 1].to(device))
                hidden.append(sink[0][0].to(store))
                for i in range(n):
                    extras[i].append(sink[i][1:])
    finally:
        for i in range(n):
            layers[i] = originals[i]
    _check_no_carried_state(out, extras)
    return hidden, extras


def _check_no_carried_state(out: list, extras: list[list]) -> None:
    """A layer whose output besides the hidden states is an input of the next (ZAYA's router states) carries a
    second stream that the stage's feed, which passes hidden states alone, would replay stale: refuse it."""
    from .errors import WITHOUT_LAYER_STAGE, UnsupportedArchitecture

    args0, kwargs0 = extras[0][0] if extras and extras[0] else ((), {})
    given = (*args0, *kwargs0.values())  # what layer 0 passes through unchanged is not its own state
    carried = [t for t in (out[0][1:] if out and isinstance(out[0], (tuple, list)) else ())
               if torch.is_tensor(t) and not any(t is a for a in given)]
    for layer in extras[1:]:
        args, kwargs = layer[0]
        if any(a is t for a in (*args, *kwargs.values()) for t in carried):
            raise UnsupportedArchitecture(
                "this model's decoder layers pass state to the next layer beside the hidden states, which the "
                f"per-layer stage (GPTQ, smoothing, --max-kl, --sequential) cannot replay; {WITHOUT_LAYER_STAGE}")


class Feed(nn.Module):
    """Holds one decoder layer at its full name, so the stage can drive it like a model: a [1, seq_len]
    tensor filled with window index w runs the layer on window w's cached input (filled with -1: on window
    0's input as it was when the feed was made, for the fp16 range check of the converted layer).
    `output(w)` returns the layer's output on window w; `advance_()` replaces every cached input with the
    layer's output on it: the next layer's inputs, from this layer as it is now (int8, once converted), and
    returns the largest |value| any of the layer's modules output meanwhile (the storage dtype's range)."""

    def __init__(self, path: str, layer: nn.Module, inputs: list, extras: list, device: torch.device) -> None:
        super().__init__()
        node: nn.Module = self
        *parents, leaf = path.split(".")
        for p in parents:
            node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.add_module(leaf, layer)
        self.layer, self.inputs, self.extras, self.device = [layer], inputs, extras, device
        self.first = inputs[0]

    @staticmethod
    def ids(n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the ids that run windows 0..n-1, the id that runs the check)."""
        return (torch.arange(n)[:, None].expand(n, seq_len).contiguous(),
                torch.full((1, seq_len), -1, dtype=torch.long))

    def _run(self, h: torch.Tensor, w: int) -> torch.Tensor:
        args, kwargs = self.extras[w]
        out = self.layer[0](h.to(self.device), *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out  # (GPT-1's blocks return lists)

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> None:
        w = int(ids[0, 0])
        self._run(self.first if w < 0 else self.inputs[w], max(w, 0))

    def output(self, w: int) -> torch.Tensor:
        return self._run(self.inputs[w], w)

    @torch.inference_mode()
    def advance_(self) -> float:
        top = [torch.zeros((), device=self.device)]  # on the device: no sync per module

        def hook(module, args, out):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                    top[0] = torch.maximum(top[0], t.detach().abs().amax().float().to(top[0].device))  # keeps nan

        handles = [m.register_forward_hook(hook) for m in self.layer[0].modules()]  # the layer's own output too
        try:
            for w, h in enumerate(self.inputs):
                self.inputs[w] = self._run(h, w).to(h.device)
                del h
                trim_heap()  # between windows, or the freed activations pile up in glibc's arenas
        finally:
            for handle in handles:
                handle.remove()
        v = top[0].item()
        return v if v == v else float("inf")  # nan: out of any range


def quantize_layers_(model: nn.Module, path: str, recipe, targets: list, qnames: list[str], *,
                     hidden: list | None, extras: list | None, seq_len: int, scales, device: torch.device,
                     load: Callable[[int], None] | None = None, unload: Callable[[int], None] | None = None,
                     progress: bool = True):
    """The layer loop both drivers run: for each decoder layer under `path`, `load(i)` (the sequential
    driver reads its weights), llmq/stage.py on it fed the cached `hidden` states (the float pass that
    calibrates it also leaves its outputs there as the next layer's inputs), then `unload(i)`. Without
    `hidden` (no calibration text) each layer is only converted. Returns the merged BlockResult.

    Each layer is calibrated (and its alpha searched) on the outputs of the layers before it as already
    converted to int8, the inputs it will see in use (propagated, as GPTQ does). With `hidden`, the result's
    `act_range` is the largest |value| of layer 0's input and of any module output of the int8 layers."""
    from tqdm.auto import tqdm

    from .a16 import layout_targets
    from .stage import BlockResult, quantize_block_

    layers = model.get_submodule(path)
    groups, a16 = layout_targets(model, qnames, recipe.quantization.a16)
    total = BlockResult(a16_count=len(a16))
    if hidden is not None:
        total.act_range = max((h.abs().amax().item() for h in hidden), default=0.0)
    for i in tqdm(range(len(layers)), desc="layers", unit="layer", disable=not progress):
        if load is not None:
            load(i)
        prefix = f"{path}.{i}."
        root, ids, check = model, None, None
        if hidden is not None:
            root = Feed(prefix[:-1], layers[i], hidden, extras[i], device)
            ids, check = Feed.ids(len(hidden), seq_len)
        res = quantize_block_(root, recipe, [t for t in targets if t.prev_name.startswith(prefix)],
                              [n for n in qnames if n.startswith(prefix)], ids=ids, check_ids=check,
                              scales=scales, layout=([t for t in groups if t.prev_name.startswith(prefix)],
                                                     {n for n in a16 if n.startswith(prefix)}))
        if hidden is not None:
            total.act_range = max(total.act_range, root.advance_())
        total.act_max.update(res.act_max)
        total.alphas.update(res.alphas)
        total.errors.update(res.errors)
        total.refined.update(res.refined)
        total.originals.update(res.originals)
        total.layout.update(res.layout)
        total.tokens = res.tokens
        if unload is not None:
            unload(i)
    return total
