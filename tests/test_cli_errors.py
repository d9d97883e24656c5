"""The bad-input battery: `llmq` run as a user runs it (`python -m llmq.cli` in a subprocess, offline, with
the session's asset cache) on one table of bad inputs. Adding a kind of bad input is one row of `CASES`.

Every row must: exit 2 (llmq's code for user errors; argparse usage errors too); print exactly one line on
stderr, starting with `llmq: error:`, holding the row's `what` (what was wrong) and `fix` (how to fix it)
fragments; print nothing on stdout and no traceback anywhere; leave no output (neither `--out` nor a
hidden `.NAME.llmq-tmp-*` folder beside it); change no input (sha256 of every file it names, before and
after). Rows run with `-q`, so a stray warning is an extra stderr line and fails the row.

Validation before the expensive work, checked without a clock: the rows that name `{broken}` as the model
give a checkpoint whose config.json is fine but whose model.safetensors is truncated. llmq reads those
weights before calibrating, so if it looked at the bad flag, output or text only after loading the model,
the user would get the weights error instead of the row's message: every such row proves its check runs
before the weights are read (most of them before torch is even imported).

Read-only output: tests run as root here, and root writes through `chmod 555`. The row then uses a path
under /proc, which refuses every write even to root (os.access still says it is writable, which is why
llmq probes by creating a folder); as a normal user it is a `chmod 555` folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_text, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
TMP_MARK = ".llmq-tmp-"
FAKE_TOKEN = "hf_LLMQfakeTOKENneverPRINTED0123456789abcdef"  # recognisable; must never leave the env
PARALLEL = min(4, max(2, os.cpu_count() or 2))  # subprocesses at a time (2 on the 2-core CI)


# --- running llmq ---------------------------------------------------------------------------------
def cli_env(**overrides: str | None) -> dict[str, str]:
    """A user's environment on an offline machine, with the session's asset cache (nothing refetched)."""
    from llmq.assets import cache_dir

    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "PYTEST_CURRENT_TEST")}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", LLMQ_CACHE=str(cache_dir()), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@dataclass
class Run:
    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float = 0.0

    def show(self) -> str:
        return f"$ llmq {shlex.join(self.argv)}\nexit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"


def llmq(argv: list[str], env: dict[str, str], timeout: float = 600) -> Run:
    p = subprocess.run([sys.executable, "-m", "llmq.cli", *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(argv, p.returncode, p.stdout, p.stderr)


def sha256_tree(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (hidden ones included), by relative path."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """The hidden temporary folders of llmq's atomic writes still lying beside `out`."""
    try:
        return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_MARK}"))
    except OSError:  # the parent does not exist or is a file: nothing can lie there
        return []


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")  # formats that can run code


def pickles_in(names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(PICKLES)]


# --- the bad inputs ---------------------------------------------------------------------------------
def _write_remote_code(folder: Path, marker: Path) -> None:
    """A tiny llama checkpoint that needs custom code (config auto_map); importing that code creates `marker`."""
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "configuration_evil.py").write_text(
        "from pathlib import Path\n\nfrom transformers import LlamaConfig\n\n"
        f"Path({str(marker)!r}).write_text('custom code ran')\n\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n")
    (folder / "modeling_evil.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_evil import EvilConfig\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")


def _readonly_dir(root: Path) -> Path:
    """A folder nobody may write into: chmod 555, or /proc where root ignores permission bits."""
    d = root / "readonly"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").mkdir()
    except PermissionError:
        return d
    (d / "probe").rmdir()
    return Path("/proc")


def build_inputs(root: Path) -> dict[str, str]:
    """Every input of the battery, under `root`; returns the `{name}` placeholders of `CASES`."""
    from safetensors.torch import save_file
    from transformers import (
        AutoModelForCausalLM,
        BertConfig,
        BertModel,
        CTRLConfig,
        FalconConfig,
        MambaConfig,
        MixtralConfig,
    )

    from llmq.assets import model_folder, model_gguf, wiki_text_path

    model_folder(), wiki_text_path()  # llmq:smollm2 and llmq:wiki rows must not fetch or convert them
    inp = root / "inputs"
    inp.mkdir()
    tok = tiny_tokenizer()
    assert tok.pad_token is None  # llmq never pads: the tiny tokenizer has no pad token on purpose
    p: dict[str, Path] = {}

    def model(name: str, m, tokenizer=tok) -> Path:
        p[name] = inp / name
        m.save_pretrained(p[name])
        tokenizer.save_pretrained(p[name])
        return p[name]

    model("tiny", tiny_llama())  # max_position_embeddings 256, no pad token
    model("tiny300", tiny_llama(vocab_size=300))
    st = (p["tiny"] / "model.safetensors").read_bytes()
    broken = model("broken", tiny_llama())  # config fine, weights truncated
    (broken / "model.safetensors").write_bytes(st[: len(st) // 2])
    garbled = model("garbled", tiny_llama())  # header length field points far beyond the file
    (garbled / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + st[8:])
    nan = tiny_llama()
    with torch.no_grad():
        nan.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model("nan", nan)
    hot = tiny_llama()  # finite weights, activations overflow float32 inside layer 0's MLP
    with torch.no_grad():
        hot.model.layers[0].mlp.up_proj.weight.fill_(3e38)
    model("overflow", hot)
    fp16 = tiny_llama()  # finite everywhere in float32, but q/k/v inputs far beyond float16's 65504
    with torch.no_grad():
        fp16.model.layers[0].input_layernorm.weight.fill_(1e6)
    model("fp16range", fp16)
    big = tiny_llama()  # a weight no float16 can hold (bitsandbytes quantizes through float16)
    with torch.no_grad():
        big.model.layers[1].self_attn.o_proj.weight[0, 0] = 1e6
    model("bigweight", big)
    model("ctrl", AutoModelForCausalLM.from_config(CTRLConfig(  # a family outside llmq/arch.py
        n_embd=64, n_layer=2, n_head=4, dff=128, vocab_size=256, n_positions=256, bos_token_id=1, eos_token_id=2)))
    model("mamba", AutoModelForCausalLM.from_config(MambaConfig(  # dt_proj's weight is read, the module not called
        hidden_size=64, num_hidden_layers=2, state_size=8, vocab_size=256, bos_token_id=1, eos_token_id=2)))
    model("falcon", AutoModelForCausalLM.from_config(FalconConfig(  # FalconLinear: no stock int8 reload
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, new_decoder_architecture=True,
        num_kv_heads=2, bos_token_id=1, eos_token_id=2)))
    model("moe", AutoModelForCausalLM.from_config(MixtralConfig(  # experts are 3-D parameters, not linears
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)))
    model("bert", BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=256)))
    p["noconfig"] = inp / "noconfig"
    p["noconfig"].mkdir()
    (p["noconfig"] / "model.safetensors").write_bytes(st)
    p["remote"], p["remote_marker"] = inp / "remote", root / "custom-code-ran"
    _write_remote_code(p["remote"], p["remote_marker"])
    with open(model_gguf(), "rb") as f:
        (inp / "trunc.gguf").write_bytes(f.read(1 << 20))
    p["gguf_trunc"] = inp / "trunc.gguf"
    p["gguf_fake"] = inp / "fake.gguf"
    p["gguf_fake"].write_text("not a gguf file\n")

    files = {
        "text": tiny_text(4000), "short": "w3 w4 w5 w6 w7", "one_token": "w3", "empty": "", "blank": " \n\t\n",
        "bad.jsonl": '{"text": "w3 w4"}\n{"text": oops}\n', "notext.jsonl": '{"body": "w3 w4"}\n',
        "data.csv": "text\nw3 w4\n",
        "recipe_unknown.yaml": "calibration:\n  samples: 4\n  sampels: 8\n",
        "recipe_type.yaml": "calibration:\n  samples: many\n",
        "recipe_syntax.yaml": "calibration: {samples: 4\n", "recipe_list.yaml": "- smoothquant\n- llm-int8\n",
    }
    for name, text in files.items():
        path = inp / (name if "." in name else f"{name}.txt")
        path.write_text(text, encoding="utf-8")
        p[name.split(".")[0]] = path
    p["binary"] = inp / "binary.txt"
    p["binary"].write_bytes(bytes(range(256)) * 8)  # not UTF-8
    p["nul"] = inp / "nul.txt"
    p["nul"].write_bytes(b"w3 w4\x00w5 w6\n" * 50)  # UTF-8, but NUL bytes
    p["textdir"] = inp / "corpus.txt"
    p["textdir"].mkdir()
    (p["textdir"] / "part1.txt").write_text(tiny_text(100))
    p["scales_other"] = inp / "scales_other.safetensors"  # another family's layer names
    save_file({f"transformer.h.{i}.{n}": torch.ones(64) for i in range(2) for n in ("attn.c_attn", "mlp.c_fc")},
              str(p["scales_other"]))
    p["scales_shape"] = inp / "scales_shape.safetensors"  # this model's names, another model's width
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]
    save_file({n: torch.ones(32) for n in names}, str(p["scales_shape"]))
    p["scales_huge"] = inp / "scales_huge.safetensors"  # right names and width, absurd maxima
    save_file({n: torch.full((128 if n.endswith("down_proj") else 64,), 1e30) for n in names},
              str(p["scales_huge"]))
    p["scales_wmean"] = inp / "scales_wmean.safetensors"  # right names and width, the other statistic
    save_file({n: torch.ones(128 if n.endswith("down_proj") else 64) for n in names}, str(p["scales_wmean"]),
              metadata={"llmq_statistic": "window-mean"})
    p["scales_junk"] = inp / "junk.safetensors"
    p["scales_junk"].write_bytes(b"\x00" * 100)
    p["outfile"] = inp / "out.txt"
    p["outfile"].write_text("I am a file, not a folder\n")
    p["existing"] = inp / "existing-out"
    p["existing"].mkdir()
    (p["existing"] / "keep.txt").write_text("an earlier result\n")
    p["fake_out"] = inp / "llmq-out"  # looks like an llmq output folder, for `llmq push`
    p["fake_out"].mkdir()
    (p["fake_out"] / "config.json").write_text("{}")
    (p["fake_out"] / "llmq_report.json").write_text('{"method": "smoothquant"}')
    (p["fake_out"] / "README.md").write_text("card\n")
    p["readonly"] = _readonly_dir(root)
    p["missing"] = root / "does-not-exist"
    p["hf_home"] = root / "hf-home"
    p["hf_home"].mkdir()
    return {k: str(v) for k, v in p.items()}


# --- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """`argv`: a shell-like string; `{name}` are inputs (build_inputs), `{out}` a fresh output path."""

    name: str
    argv: str
    what: str  # fragment saying what was wrong
    fix: str  # fragment saying how to fix it
    env: dict = field(default_factory=dict)  # environment overrides (None removes a variable)
    code: int = 2
    needs_cpu_only: bool = False
    slow: bool = False  # loads the real SmolLM2


Q = "quantize {broken} --out {out}"  # bad flags: the {broken} weights prove they are found before loading
T = "quantize {tiny} --calib {text} --calib-samples 2 --calib-seq-len 16 --out {out}"
E = "eval {tiny} --data {text} --seq-len 32 --max-tokens 128"
NET = {"HF_HUB_OFFLINE": "0"}  # push checks: online mode, still no request (they fail first)

CASES = [
    # usage errors (argparse, one line)
    Case("command-unknown", "quantise {tiny} --out {out}", "invalid choice: 'quantise'", "--help"),
    Case("out-missing", "quantize {broken}", "required: --out", "--help"),
    Case("flag-unknown", Q + " --alpah 0.5", "unrecognized arguments: --alpah", "--help"),
    Case("method-unknown", Q + " --method int4", "invalid choice: 'int4'", "choose from"),
    Case("dtype-unknown", Q + " --dtype float8", "invalid choice: 'float8'", "choose from"),
    Case("storage-dtype-unknown", Q + " --storage-dtype int4", "invalid choice: 'int4'", "choose from"),
    Case("int-not-int", Q + " --calib-samples 1e3", "invalid int value: '1e3'", "--help"),
    # recipe values, from flags, --set and YAML files
    Case("alpha-negative", Q + " --alpha -1", "got '-1'", "in [0, 1] or 'auto'"),
    Case("alpha-2", Q + " --alpha 2", "got '2'", "in [0, 1] or 'auto'"),
    Case("alpha-nan", Q + " --alpha nan", "got 'nan'", "in [0, 1] or 'auto'"),
    Case("alpha-word", Q + " --alpha strong", "got 'strong'", "a number in [0, 1] or 'auto'"),
    Case("calib-seq-len-0", Q + " --calib-seq-len 0", "calibration.seq_len", ">= 2, got 0"),
    Case("calib-seq-len-negative", Q + " --calib-seq-len -8", "calibration.seq_len", ">= 2, got -8"),
    Case("calib-samples-0", Q + " --calib-samples 0", "calibration.samples", ">= 1, got 0"),
    Case("calib-statistic-unknown", Q + " --set calibration.statistic=median", "calibration.statistic",
         "one of auto, max, window-mean, got 'median'"),
    Case("threshold-negative", Q + " --method llm-int8 --threshold -1", "threshold", ">= 0, got -1"),
    Case("threshold-weight-only", Q + " --method weight-only --threshold 6", "weight-only", "leave it unset"),
    Case("a16-method", Q + " --method weight-only --a16 down_proj", "quantization.a16", "needs --method smoothquant"),
    Case("a16-threshold", Q + " --a16 down_proj --threshold 4", "sets the threshold itself", "leave"),
    Case("a16-part-of-group", T + " --a16 q_proj", "but not the other linears fed by", "name all of them or none"),
    Case("set-no-equals", Q + " --set smoothing.alpha", "--set expects key=value", "--set smoothing.alpha=0.8"),
    Case("set-unknown-key", Q + " --set calibration.sampels=8", "unknown recipe key 'calibration.sampels'",
         "allowed here: ['act_scales', 'bos', 'samples'"),
    Case("set-wrong-type", Q + " --set calibration.samples=[1,2]", "expected an integer", "calibration: samples"),
    Case("set-unknown-group", Q + " --set smoothing.groups=[attn,ffn]", "unknown ['ffn']", "allowed"),
    Case("recipe-missing", Q + " --recipe {missing}.yaml", "does not exist", "configs/default.yaml"),
    Case("recipe-unknown-key", Q + " --recipe {recipe_unknown}", "unknown key(s) ['sampels']", "allowed"),
    Case("recipe-wrong-type", Q + " --recipe {recipe_type}", "expected an integer, got 'many'", "samples"),
    Case("recipe-bad-yaml", Q + " --recipe {recipe_syntax}", "is not valid YAML (line 2, column 1", "fix it there"),
    Case("recipe-not-mapping", Q + " --recipe {recipe_list}", "must be a mapping", "got list"),
    Case("device-unknown", Q + " --device tpu", "got 'tpu'", "auto, cpu or cuda[:N]"),
    Case("storage-dtype-set", Q + " --set quantization.storage_dtype=fp8", "storage_dtype (--storage-dtype)",
         "auto, bfloat16, float16, float32, got 'fp8'"),
    Case("base-model-not-hub-id", Q + " --base-model ./my-model", "base_model (--base-model)",
         "Hub id like 'org/name', got './my-model'"),
    Case("max-memory-syntax", Q + " --max-memory lots", "memory size 'lots' is not understood", "e.g. 24GiB"),
    Case("sequential-with-eval", Q + " --sequential --eval", "--eval needs the float and INT8 models",
         "llmq eval OUT"),
    Case("device-cuda-absent", Q + " --device cuda", "CUDA is not available", "--device cpu",
         needs_cpu_only=True),
    # outputs
    Case("out-is-file", "quantize {broken} --out {outfile}", "is a file", "give a folder path"),
    Case("out-exists", "quantize {broken} --out {existing}", "already exists", "--overwrite"),
    Case("out-parent-is-file", "quantize {broken} --out {outfile}/int8", "is not a folder", "another --out"),
    Case("out-read-only", "quantize {broken} --out {readonly}/llmq-battery-out", "cannot write into",
         "another --out"),
    # push arguments (checked before the model is loaded)
    Case("push-bad-repo-id", Q + " --push 'my model'", "repo id 'my model' is not valid", "user/name"),
    Case("push-no-token", Q + " --push user/model", "no Hugging Face token", "HF_TOKEN", env=NET),
    Case("push-offline", Q + " --push user/model", "HF_HUB_OFFLINE=1", "unset it", env={"HF_TOKEN": FAKE_TOKEN}),
    Case("push-cmd-not-folder", "push {missing} user/model", "is not a folder", "llmq quantize MODEL --out DIR"),
    Case("push-cmd-not-llmq", "push {tiny} user/model --dry-run", "not an llmq output folder",
         "llmq quantize MODEL --out DIR"),
    Case("push-cmd-no-token", "push {fake_out} user/model", "no Hugging Face token", "hf auth login", env=NET),
    Case("push-cmd-bad-repo-id", "push {fake_out} user/my/model", "is not valid", "user/name"),
    Case("push-cmd-empty-revision", "push {fake_out} user/model --revision ''", "--revision", "branch name"),
    # text sources (checked before the model is loaded, except what needs its tokenizer)
    Case("calib-missing", Q + " --calib {missing}.txt", "is not a file", ".txt/.jsonl/.json"),
    Case("calib-dir", Q + " --calib {textdir}", "is not a file", ".txt/.jsonl/.json"),
    Case("calib-empty", Q + " --calib {empty}", "is empty", "give it some text"),
    Case("calib-blank", Q + " --calib {blank}", "is empty", "give it some text"),
    Case("calib-binary", Q + " --calib {binary}", "is not UTF-8 text", "convert it to UTF-8"),
    Case("calib-nul-bytes", Q + " --calib {nul}", "looks binary", "UTF-8 text file"),
    Case("calib-jsonl-bad-line", Q + " --calib {bad}", "bad.jsonl:2: invalid JSON", "fix or remove that line"),
    Case("calib-jsonl-no-text", Q + " --calib {notext}", "expected an object with a string 'text' field",
         "notext.jsonl line 1"),
    Case("calib-extension", Q + " --calib {data}", "unsupported extension", ".txt/.jsonl/.json"),
    Case("calib-dataset-offline", Q + " --calib wikitext2", "needs the Hugging Face Hub", "llmq:wiki"),
    Case("calib-too-short", "quantize {tiny} --calib {short} --calib-samples 2 --calib-seq-len 16 --out {out}",
         "calibration text has 5 tokens", "fewer --calib-samples"),
    Case("eval-data-missing", Q + " --eval --set evaluation.data={missing}.txt", "is not a file", ".jsonl"),
    Case("act-scales-missing", Q + " --alpha 0.5 --act-scales {missing}.safetensors", "does not exist",
         "act_scales.safetensors of an earlier llmq output"),
    Case("act-scales-not-safetensors", Q + " --alpha 0.5 --act-scales {scales_junk}", "not a readable",
         "act_scales.safetensors of an earlier llmq output"),
    Case("act-scales-other-statistic", Q + " --alpha 0.5 --act-scales {scales_wmean} --set calibration.statistic=max",
         "holds the window-mean statistic and this run asks for max", "--set calibration.statistic=window-mean"),
    # models
    Case("model-missing", "quantize {missing} --out {out}", "does not exist", "a Hub id like 'org/name'"),
    Case("model-hub-offline", "quantize someorg/some-model --out {out}", "HF_HUB_OFFLINE=1", "download it first"),
    Case("model-no-config", "quantize {noconfig} --out {out}", "has no config.json", "save_pretrained"),
    Case("model-gguf-truncated", "quantize {gguf_trunc} --out {out}", "cannot load", "re-download"),
    Case("model-gguf-fake", "quantize {gguf_fake} --out {out}", "is not a model", ".gguf file"),
    Case("model-text-file", "quantize {text} --out {out}", "is not a model", "config.json"),
    Case("model-safetensors-truncated", "quantize {broken} --out {out}", "cannot load", "re-download"),
    Case("model-safetensors-garbled", "quantize {garbled} --out {out}", "cannot load", "re-download"),
    Case("model-not-causal", "quantize {bert} --out {out}", "BertModel checkpoint", "...ForCausalLM"),
    Case("model-custom-code", "quantize {remote} --out {out}", "contains custom code", "--trust-remote-code"),
    Case("arch-not-in-table", T.replace("{tiny}", "{ctrl}"), "no table entry for model type 'ctrl'",
         "--method llm-int8"),
    Case("arch-unreached-linear", T.replace("{tiny}", "{mamba}") + " --method llm-int8",
         "no calibration input reached backbone.layers.0.mixer.dt_proj", r"--skip backbone.layers.0.mixer.dt_proj",
         env={"TRANSFORMERS_VERBOSITY": "error"}),  # (transformers' own warnings: Mamba's kernels fall back)
    Case("arch-falcon-smoothquant", T.replace("{tiny}", "{falcon}"), "projections are FalconLinear",
         "keep this model in 16-bit"),
    Case("arch-falcon-llm-int8", T.replace("{tiny}", "{falcon}") + " --method llm-int8",
         "projections are FalconLinear", "keep this model in 16-bit"),
    Case("arch-falcon-sequential", "quantize {falcon} --method weight-only --sequential --out {out}",
         "projections are FalconLinear", "keep this model in 16-bit"),
    Case("arch-falcon-plan", "plan {falcon} --method llm-int8", "projections are FalconLinear",
         "keep this model in 16-bit"),
    Case("arch-moe-llm-int8", T.replace("{tiny}", "{moe}") + " --method llm-int8", "MixtralExperts's 3-D weights",
         "keep this model in 16-bit"),
    Case("arch-moe-sequential", "quantize {moe} --method weight-only --sequential --out {out}",
         "MixtralExperts's 3-D weights", "keep this model in 16-bit"),
    Case("arch-moe-plan", "plan {moe} --method weight-only", "MixtralExperts's 3-D weights",
         "keep this model in 16-bit"),
    Case("rotate-family", T.replace("{tiny}", "{ctrl}") + " --method weight-only --rotate",
         "not 'ctrl': the rotation folds", "drop --rotate"),
    Case("rotate-sequential", "quantize {broken} --rotate --sequential --out {out}",
         "sequential mode (--sequential given) never holds at once", "drop --rotate, or --sequential"),
    Case("weights-nan", T.replace("{tiny}", "{nan}"), "inf/nan in model.layers.1.mlp.down_proj.weight",
         "re-download"),
    Case("calib-seq-len-beyond-positions", T + " --calib-seq-len 512", "max_position_embeddings (256)",
         "use 256 or less"),
    Case("quantize-eval-seq-len-beyond", T + " --eval --set evaluation.data={text} --set evaluation.seq_len=1024",
         "evaluation.seq_len is 1024,", "use 256 or less"),
    Case("act-scales-other-model", T + " --alpha 0.5 --act-scales {scales_other}", "does not match this model",
         "recalibrate without it"),
    Case("act-scales-other-width", T + " --alpha 0.5 --act-scales {scales_shape}", "have shapes",
         "recalibrate without --act-scales"),
    # numerical faults, named by layer
    Case("rotation-overflow", T.replace("{tiny}", "{overflow}"), "rotating the residual stream overflowed float32",
         "--no-rotate"),
    Case("activations-overflow", T.replace("{tiny}", "{overflow}") + " --no-rotate",
         "non-finite activations (inf/nan) at the input of model.layers.0.mlp.down_proj", "--dtype float32"),
    Case("activations-beyond-fp16", T.replace("{tiny}", "{fp16range}") + " --alpha 0",
         "float16 range at model.layers.0.self_attn.q_proj", "--method llm-int8"),
    Case("weight-beyond-fp16", T.replace("{tiny}", "{bigweight}") + " --method llm-int8",
         "weights of model.layers.1.self_attn.o_proj reach |w| = 1e+06", "--skip model.layers.1.self_attn.o_proj"),
    Case("smoothing-overflow", T + " --alpha 1 --act-scales {scales_huge}", "model.layers.0.self_attn",
         "smaller alpha"),
    Case("real-model-seq-len-beyond-positions", "quantize llmq:smollm2 --calib-seq-len 9000 --out {out}",
         "calibration.seq_len (--calib-seq-len) is 9000", "use 8192 or less", slow=True),
    # eval
    Case("eval-model-missing", "eval {missing}", "does not exist", "a Hub id like 'org/name'"),
    Case("eval-data-dir", "eval {tiny} --data {textdir}", "is not a file", ".txt/.jsonl/.json"),
    Case("eval-max-memory-syntax", "eval {broken} --max-memory 0=abc", "memory size 'abc'", "e.g. 24GiB"),
    Case("eval-seq-len-0", E + " --seq-len 0", "evaluation.seq_len", ">= 2, got 0"),
    Case("eval-seq-len-beyond-positions", E + " --seq-len 1024", "max_position_embeddings (256)",
         "use 256 or less"),
    Case("eval-max-tokens-negative", E + " --max-tokens -5", "evaluation.max_tokens", ">= 2, got -5"),
    Case("eval-one-token", "eval {tiny} --data {one_token} --seq-len 32", "at least 2 tokens", "longer text"),
    Case("eval-reference-vocab", E + " --reference {tiny300}", "vocabulary of 256 tokens and the reference 300",
         "share a tokenizer"),
    Case("eval-json-no-folder", E + " --json {missing}/result.json", "does not exist", "choose another --json"),
]
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"


@dataclass
class Battery:
    root: Path
    paths: dict[str, str]
    before: dict[str, dict[str, str]]  # input name -> sha256 tree, before any case ran
    runs: dict[str, tuple[Run, Path | None, dict[str, dict[str, str]]]]  # name -> (run, fresh out, after)


def _inputs_named(argv: str, inputs: dict) -> list[str]:
    return sorted(k for k in inputs if "{" + k + "}" in argv)


def _run_case(case: Case, b: Battery):
    out = b.root / "outs" / case.name
    argv = [a.format(out=str(out), **b.paths) for a in shlex.split(case.argv)]
    t0 = time.perf_counter()
    run = llmq(["-q", *argv], cli_env(HF_HOME=b.paths["hf_home"], **case.env))
    run.seconds = time.perf_counter() - t0
    after = {k: sha256_tree(Path(b.paths[k])) for k in _inputs_named(case.argv, b.before)}
    return run, (out if "{out}" in case.argv else None), after


@pytest.fixture(scope="module")
def battery(request, tmp_path_factory) -> Battery:
    """Build the inputs, then run the selected rows (PARALLEL at a time) and keep what each one saw."""
    root = tmp_path_factory.mktemp("battery")
    (root / "outs").mkdir()
    paths = build_inputs(root)
    before = {k: sha256_tree(Path(v)) for k, v in paths.items()
              if Path(v).exists() and k not in ("readonly", "hf_home")}
    b = Battery(root, paths, before, {})
    wanted = {item.callspec.params["case"].name for item in request.session.items
              if getattr(item, "originalname", "") == "test_bad_input"}
    todo = [c for c in CASES if c.name in wanted]
    with ThreadPoolExecutor(PARALLEL) as pool:
        for case, res in zip(todo, pool.map(lambda c: _run_case(c, b), todo), strict=True):
            b.runs[case.name] = res
    seen = {name: {"code": r.code, "stderr": r.err, "argv": r.argv, "seconds": round(r.seconds, 2)}
            for name, (r, _, _) in b.runs.items()}
    (root / "seen.json").write_text(json.dumps(seen, indent=1))  # what docs/errors.md quotes
    yield b
    if paths["readonly"] != "/proc":
        Path(paths["readonly"]).chmod(0o755)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input(case: Case, battery: Battery) -> None:
    if case.needs_cpu_only and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run, out, after = battery.runs[case.name]
    show = run.show()
    assert "Traceback" not in run.out + run.err, show
    assert run.code == case.code, show
    assert run.out == "", show
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmq: error: "), show
    assert case.what in lines[0] and case.fix in lines[0], show
    if out is not None:
        assert not out.exists(), show
        assert leftovers(out) == [], show
    for name, digest in after.items():
        assert digest == battery.before[name], f"{case.name} changed the input {name}"


def test_at_least_30_kinds_of_bad_input() -> None:
    assert len(CASES) >= 30


def test_no_input_changed_and_no_leftovers(battery: Battery) -> None:
    """After the whole battery: every input as it was, nothing temporary left anywhere in the workspace."""
    now = {k: sha256_tree(Path(v)) for k, v in battery.paths.items() if k in battery.before}
    assert now == battery.before
    assert not (Path(battery.paths["remote_marker"])).exists(), "custom code ran without --trust-remote-code"
    assert [p for p in battery.root.rglob(f"*{TMP_MARK}*")] == []
    assert sorted(battery.root.joinpath("outs").iterdir()) == []
    assert not Path(battery.paths["missing"]).exists()  # e.g. `--json {missing}/result.json` made no folder


# --- what must work ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,threshold", [("llm-int8", 6.0), ("weight-only", 1e-6)])
def test_unsupported_architecture_quantizes_with_llm_int8_or_weight_only(battery: Battery, tmp_path: Path,
                                                                         method: str, threshold: float) -> None:
    """The same model the smoothing table refuses (row arch-not-in-table) quantizes with --method llm-int8, and
    with weight-only at its default alpha auto, which then rescales nothing (no table entry) and says so."""
    out = tmp_path / "ctrl-int8"
    run = llmq(["quantize", battery.paths["ctrl"], "--method", method, "--calib", battery.paths["text"],
                "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)],
               cli_env(HF_HOME=battery.paths["hf_home"]))
    assert run.code == 0 and "Traceback" not in run.err, run.show()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_threshold"] == threshold
    assert leftovers(out) == [] and pickles_in([p.name for p in files_under(out)]) == []
    report = json.loads((out / "llmq_report.json").read_text())
    assert report.get("alphas") in (None, {}) and report.get("guard") is None
    assert ("no activation-aware scaling" in run.err) == (method == "weight-only")


@pytest.fixture(scope="module")
def good_run(battery: Battery, tmp_path_factory):
    """A successful quantize + push of the tiny model (no pad token) with a fake HF_TOKEN, against a local
    fake Hub, logging at full verbosity (HF_DEBUG too)."""
    from fakehub import FakeHub

    root = tmp_path_factory.mktemp("good")
    out = root / "tiny-int8"
    with FakeHub(root / "hub", token=FAKE_TOKEN) as hub:
        env = cli_env(HF_HOME=battery.paths["hf_home"], HF_TOKEN=FAKE_TOKEN, HF_HUB_OFFLINE="0",
                      HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_DEBUG="1",
                      NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        run = llmq(["quantize", battery.paths["tiny"], "--calib", battery.paths["text"], "--calib-samples", "4",
                    "--calib-seq-len", "32", "--out", str(out), "--push", "fake-user/tiny-int8"], env)
        yield run, out, hub


def test_tokenizer_without_pad_token_works(battery: Battery, good_run) -> None:
    """llmq never pads (calibration and evaluation windows all have one length), so no pad token is needed."""
    from transformers import AutoTokenizer

    run, out, _ = good_run
    assert AutoTokenizer.from_pretrained(battery.paths["tiny"]).pad_token is None
    assert run.code == 0, run.show()  # (HF_DEBUG makes huggingface_hub log its own tracebacks: not checked)
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


def test_only_safetensors_are_written(good_run) -> None:
    run, out, hub = good_run
    assert run.code == 0, run.show()
    written = [p.name for p in files_under(out)] + list(hub.files("fake-user/tiny-int8"))
    assert "model.safetensors" in written and "act_scales.safetensors" in written
    assert pickles_in(written) == []


def test_token_never_leaks(good_run) -> None:
    """HF_TOKEN reaches the Hub in the Authorization header and nowhere else: not stdout, stderr, logs,
    the card, the report, or any file of the output or of the pushed repo."""
    run, out, hub = good_run
    assert run.code == 0, run.show()
    assert any(FAKE_TOKEN in h for h in hub.auth_headers)  # it was really used
    assert FAKE_TOKEN not in run.out + run.err
    for p in files_under(out) + files_under(hub.root):
        assert FAKE_TOKEN.encode() not in p.read_bytes(), p


def test_custom_code_runs_only_with_the_flag(battery: Battery, tmp_path: Path) -> None:
    """Row model-custom-code refuses the checkpoint and its code never runs (marker absent, checked after the
    battery); with --trust-remote-code the same checkpoint loads its code and quantizes."""
    marker = Path(battery.paths["remote_marker"])
    assert not marker.exists()
    out = tmp_path / "custom-int8"
    run = llmq(["-q", "quantize", battery.paths["remote"], "--trust-remote-code", "--method", "llm-int8",
                "--calib", battery.paths["text"], "--calib-samples", "4", "--calib-seq-len", "32",
                "--out", str(out)], cli_env(HF_HOME=battery.paths["hf_home"]))
    assert run.code == 0 and "Traceback" not in run.err, run.show()
    assert marker.read_text() == "custom code ran"
    assert pickles_in([p.name for p in files_under(out)]) == []
    marker.unlink()  # test_no_input_changed_and_no_leftovers checks it stays absent after the battery
