"""`llmq export --format compressed-tensors` (and `quantize --format`): the same int8 model in the format vLLM
serves, reloaded by stock transformers + compressed-tensors in a process that never imports llmq."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_text, tiny_tokenizer

from llmq.cli import main

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[3]))
out = {}
for key, folder in (("export", sys.argv[1]), ("bnb", sys.argv[2])):
    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[key] = m(ids).logits
    out[key + "_types"] = sorted({type(x).__name__ for x in m.modules()})
assert "llmq" not in sys.modules
torch.save(out, sys.argv[4])
"""
IDS = torch.randint(3, 256, (4, 64), generator=torch.Generator().manual_seed(1)).tolist()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _llmq(argv: list[str], capsys) -> tuple[int, str]:
    code = main(["-q", *argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama folder, a calibration text, and its llmq folders for each method (quantized via the CLI).
    Float32 storage of what is not int8, as the fp32 emulation runs it. Round-to-nearest weights (--no-gptq):
    the emulation bound below holds for them (9e-5); with GPTQ weights the CPU emulation differs from
    compressed-tensors by 1.4e-3, not yet explained (the int8 values and scales are still copied bit for bit:
    test_w8a8_export_holds_the_same_int8_values)."""
    root = tmp_path_factory.mktemp("export")
    tiny_llama().save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "text.txt").write_text(tiny_text())
    paths = {"root": root, "tiny": root / "tiny"}
    for method in ("smoothquant", "weight-only", "llm-int8"):
        paths[method] = root / method
        assert main(["-q", "quantize", str(root / "tiny"), "--method", method, "--alpha", "0.5",
                     "--calib", str(root / "text.txt"), "--calib-samples", "4", "--calib-seq-len", "32",
                     "--no-gptq", "--storage-dtype", "float32", "--out", str(paths[method])]) == 0
    return paths


def _reload(dst: Path, src: Path, tmp_path: Path) -> dict:
    out = tmp_path / "reload.pt"
    subprocess.run([sys.executable, "-c", RELOAD, str(dst), str(src), json.dumps(IDS), str(out)], check=True)
    return torch.load(out)


def _emulate(src: Path, denom: float) -> torch.Tensor:
    """Independent reference: the tiny llama with the bitsandbytes folder's weights dequantized (int8 * SCB / 127)
    and each int8 linear's input quantized per token, scale = absmax / denom, rounded and clamped to int8."""
    from safetensors.torch import load_file

    sd = load_file(str(src / "model.safetensors"))
    dense = {}
    for k, v in sd.items():
        base = k[: -len(".weight")]
        if k.endswith((".SCB", ".weight_format")):
            continue
        dense[k] = v.float() * sd[f"{base}.SCB"][:, None] / 127 if f"{base}.SCB" in sd and k.endswith(
            ".weight") else v
    model = tiny_llama()
    model.load_state_dict(dense, strict=True)

    def fake_quant(module, args):
        s = args[0].abs().amax(-1, keepdim=True) / denom
        return ((args[0] / s).round().clamp(-128, 127) * s,)

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(fake_quant)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def test_w8a8_export_holds_the_same_int8_values(tiny, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open

    src, dst = tiny["smoothquant"], tmp_path / "ct"
    code, err = _llmq(["export", str(src), "--format", "compressed-tensors", "--out", str(dst)], capsys)
    assert code == 0, err
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors", "int-quantized", "compressed")
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["strategy"], w["symmetric"], w["dynamic"]) == (8, "int", "channel", True, False)
    assert (a["num_bits"], a["type"], a["strategy"], a["symmetric"], a["dynamic"]) == (8, "int", "token", True, True)
    with safe_open(str(src / "model.safetensors"), "pt") as s, safe_open(str(dst / "model.safetensors"), "pt") as d:
        int8 = sorted(k[: -len(".SCB")] for k in s.keys() if k.endswith(".SCB"))
        assert len(int8) == 14 and not any(k.endswith((".SCB", ".weight_format")) for k in d.keys())
        for n in int8:
            assert torch.equal(d.get_tensor(f"{n}.weight"), s.get_tensor(f"{n}.weight"))  # not requantized
            assert torch.equal(d.get_tensor(f"{n}.weight_scale"), (s.get_tensor(f"{n}.SCB") / 127).unsqueeze(1))
        for k in s.keys():
            if not k.endswith((".SCB", ".weight_format")) and k[: -len(".weight")] not in int8:
                assert torch.equal(d.get_tensor(k), s.get_tensor(k)), k
    names = sorted(p.name for p in dst.iterdir())
    assert "act_scales.safetensors" not in names and not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    assert {"tokenizer.json", "llmq_recipe.yaml", "README.md", "llmq_report.json"} <= set(names)
    assert all(p.stat().st_mode & stat.S_IROTH for p in dst.iterdir())
    assert json.loads((dst / "llmq_report.json").read_text())["export"]["compressed_tensors_format"] == "int-quantized"
    assert "vllm serve" in (dst / "README.md").read_text()


def test_w8a8_export_reloads_in_stock_transformers(tiny, tmp_path):
    """Tolerances. transformers + compressed-tensors on CPU decompresses the weights to float32 and fake-quantizes
    each linear's input per token with scale absmax/127.5 (clamped to [-128, 127]); the emulation with the
    bitsandbytes folder's own dequantized weights must match it to float rounding (measured 9e-5 relative: a
    few activations land on the other side of a rounding boundary). bitsandbytes itself quantizes fp16-cast
    activations with absmax/127, so against it the logits differ by about the activation-quantization noise
    itself (measured 0.64% relative, vs 0.76% between bitsandbytes and FP32); a wrong weight, scale, layout or
    lost smoothing would be off by O(100%)."""
    pytest.importorskip("compressed_tensors")
    from llmq.export import export

    export(tiny["smoothquant"], tmp_path / "ct")
    got = _reload(tmp_path / "ct", tiny["smoothquant"], tmp_path)
    assert "Linear8bitLt" not in got["export_types"] and "Linear8bitLt" in got["bnb_types"]
    assert _rel(got["export"], _emulate(tiny["smoothquant"], 127.5)) < 1e-3
    assert _rel(got["export"], got["bnb"]) < 0.02


def test_weight_only_export_is_pack_quantized_and_matches_bitsandbytes(tiny, tmp_path):
    """W8A16: both runtimes multiply unquantized activations by the same dequantized int8 weights."""
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open

    from llmq.export import export

    src, dst = tiny["weight-only"], tmp_path / "ct"
    export(src, dst)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "pack-quantized" and group.get("input_activations") is None
    assert (group["weights"]["num_bits"], group["weights"]["strategy"]) == (8, "channel")
    with safe_open(str(src / "model.safetensors"), "pt") as s, safe_open(str(dst / "model.safetensors"), "pt") as d:
        n = "model.layers.0.mlp.down_proj"
        packed, w = d.get_tensor(f"{n}.weight_packed"), s.get_tensor(f"{n}.weight")
        assert packed.dtype == torch.int32 and packed.shape == (w.shape[0], w.shape[1] // 4)
        assert d.get_tensor(f"{n}.weight_shape").tolist() == list(w.shape)
        # little end first, offset 128: the layout compressed-tensors and vLLM's WNA16 kernels unpack
        assert ((packed & 0xFF) - 128).to(torch.int8).tolist() == w[:, ::4].tolist()
    got = _reload(dst, src, tmp_path)
    assert _rel(got["export"], got["bnb"]) < 1e-5


def test_quantize_format_compressed_tensors(tiny, capsys):
    pytest.importorskip("compressed_tensors")
    out = tiny["root"] / "direct"
    code, err = _llmq(["quantize", str(tiny["tiny"]), "--alpha", "0.5", "--calib", str(tiny["root"] / "text.txt"),
                       "--calib-samples", "4", "--calib-seq-len", "32", "--format", "compressed-tensors",
                       "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    assert json.loads((out / "llmq_report.json").read_text())["method"] == "smoothquant"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no staging left


def _gpt2(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256,
                                                n_positions=256)).save_pretrained(root / "gpt2")
    tiny_tokenizer().save_pretrained(root / "gpt2")
    assert main(["-q", "quantize", str(root / "gpt2"), "--method", "weight-only", "--no-gptq", "--alpha", "0",
                 "--out", str(root / "gpt2-q")]) == 0
    return root / "gpt2-q"


@pytest.mark.parametrize("case", ["not-llmq", "llm-int8", "exists", "inside-source", "quantize-llm-int8",
                                  "no-package", "conv1d"])
def test_bad_inputs_are_one_line_errors(case, tiny, tmp_path, capsys, monkeypatch):
    if case != "no-package":
        pytest.importorskip("compressed_tensors")
    src, out = str(tiny["smoothquant"]), str(tmp_path / "out")
    argv, expect = {
        "not-llmq": (["export", str(tiny["tiny"]), "--out", out], "is not an llmq output folder"),
        "llm-int8": (["export", str(tiny["llm-int8"]), "--out", out], "cannot be exported to compressed-tensors"),
        "exists": (["export", src, "--out", str(tiny["weight-only"])], "already exists; pass --overwrite"),
        "inside-source": (["export", src, "--out", f"{src}/sub"], "is the source folder or inside it"),
        "quantize-llm-int8": (["quantize", "no/such-model-is-loaded", "--method", "llm-int8", "--format",
                               "compressed-tensors", "--out", out], "cannot be exported to compressed-tensors"),
        "no-package": (["export", src, "--out", out], "pip install compressed-tensors"),
        "conv1d": (["export", str(_gpt2(tmp_path)) if case == "conv1d" else "", "--out", out], "not an nn.Linear"),
    }[case]
    if case == "no-package":
        monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _llmq(argv, capsys)
    assert code == 2 and err.startswith("llmq: error: ") and err.count("\n") == 1 and expect in err, err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in tiny["smoothquant"].iterdir() if p.name.startswith(".")) == []


def test_sharded_source_exports_shard_by_shard(tiny, tmp_path):
    pytest.importorskip("compressed_tensors")
    import shutil

    from safetensors.torch import load_file, save_file

    from llmq.export import export

    src = tmp_path / "sharded"
    shutil.copytree(tiny["smoothquant"], src)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    keys = sorted(sd)  # layer 0 in one shard, the rest in the other (a module's tensors share a shard)
    shards = {"model-00001-of-00002.safetensors": [k for k in keys if ".layers.0." in k],
              "model-00002-of-00002.safetensors": [k for k in keys if ".layers.0." not in k]}
    for f, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(src / f), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    export(src, tmp_path / "a")
    export(tiny["smoothquant"], tmp_path / "b")
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"]
    a = {k: v for f in sorted(set(index.values())) for k, v in load_file(str(tmp_path / "a" / f)).items()}
    assert sorted(index) == sorted(a)
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
