"""The benchmark scripts (scripts/): validated config, row selection and planning, the library's calibration
windows, the decode and fidelity report parts, and script hygiene. CPU, no model runs, seconds."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_text, tiny_tokenizer

from llmq.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_config as bc  # noqa: E402


@pytest.mark.parametrize("name", ["bench.yaml", "bench-gpu.yaml"])
def test_committed_configs_validate(name: str) -> None:
    cfg = bc.load_config(REPO / "configs" / name)
    assert cfg.rows and set(cfg.decode.rows) <= {r.name for r in cfg.rows if r.kind != "fp"}


@pytest.mark.parametrize("edit, match", [
    ("evaluation:\n  seq_len: 1024\n  colour: red\n", "unknown key"),
    ("timing: {speed_windows: three}\n", "expected an integer"),
    ("decode: {rows: [fp32]}\nrows: [{name: fp32, kind: fp, dtype: float32}]\n", "not int8 rows"),
    ("rows: [{name: a, kind: gguf}]\n", "kind must be one of"),
    ("rows: [{name: a, recipe: x.yaml}, {name: a, recipe: y.yaml}]\ndecode: {rows: []}\n", "repeat"),
    ("decode: {new_tokens: 1, rows: []}\n", "decode.new_tokens"),
    ("calibration: {seed: 1, spread_seeds: [1]}\n", "spread_seeds"),
])
def test_bad_config_is_an_error(tmp_path: Path, edit: str, match: str) -> None:
    p = tmp_path / "b.yaml"
    p.write_text(edit)
    with pytest.raises(ConfigError, match=match):
        bc.load_config(p)


def test_flags_override_and_rows_select() -> None:
    cfg = bc.load_config(REPO / "configs/bench.yaml", {"max_tokens": 4096, "spread_seeds": [1, 2],
                                                        "extra_data": ["x.txt"], "decode_repeats": 2})
    assert cfg.evaluation.max_tokens == 4096 and cfg.calibration.spread_seeds == (1, 2)
    assert cfg.evaluation.texts == ("llmq:wiki", "x.txt") and cfg.decode.repeats == 2
    rows = bc.row_list(cfg)
    names = [r["name"] for r in bc.select(rows, ["fp32", "decode-*"], None)]
    assert names == ["fp32", *[f"decode-{n}" for n in cfg.decode.rows]]
    assert {r["group"] for r in bc.select(rows, None, ["sim"])} == {"sim"}
    with pytest.raises(ConfigError, match="matches no row"):
        bc.select(rows, ["nope"], None)
    with pytest.raises(ConfigError, match="--only"):
        bc.select(rows, None, ["gpu"])
    keys = {bc.settings_key(cfg, "m", r) for r in rows}
    assert len(keys) == len(rows)  # every row has its own key
    fp32 = rows[0]
    changed = bc.load_config(REPO / "configs/bench.yaml", {"spread_seeds": [5]})
    assert bc.settings_key(changed, "m", fp32) == bc.settings_key(bc.load_config(REPO / "configs/bench.yaml"), "m",
                                                                    fp32)  # FP rows never calibrate


def test_plan_runs_the_source_of_a_decode_row(tmp_path: Path) -> None:
    import benchmark

    cfg = bc.load_config(REPO / "configs/bench.yaml")
    args = argparse.Namespace(rows=["decode-weight-only"], only=None, force=False)
    todo = benchmark.plan(cfg, args, "m", tmp_path)
    assert [(r["name"], run) for r, run in todo] == [("weight-only", True), ("decode-weight-only", True)]
    for r, _ in todo:  # both measured with these settings, checkpoint kept: nothing to do
        (tmp_path / f"{r['name']}.json").write_text(json.dumps({"settings_key": bc.settings_key(cfg, "m", r)}))
    (tmp_path / "ckpt-weight-only").mkdir()
    (tmp_path / "ckpt-weight-only" / "DONE").write_text("ok\n")
    assert [run for _, run in benchmark.plan(cfg, args, "m", tmp_path)] == [False]
    shutil.rmtree(tmp_path / "ckpt-weight-only")  # checkpoint gone: its row runs again first
    assert [(r["name"], run) for r, run in benchmark.plan(cfg, args, "m", tmp_path)] == [
        ("weight-only", True), ("decode-weight-only", True)]


def test_report_takes_only_rows_measured_with_the_current_settings(tmp_path: Path) -> None:
    import benchmark

    cfg = bc.load_config(REPO / "configs/bench.yaml")
    fp32, half = bc.row_list(cfg)[:2]
    (tmp_path / "fp32.json").write_text(json.dumps({"settings_key": bc.settings_key(cfg, "m", fp32)}))
    (tmp_path / "half.json").write_text(json.dumps({"settings_key": "measured-otherwise"}))
    assert list(benchmark.collect(cfg, tmp_path, "m")) == ["fp32"]


def test_calibration_windows_are_the_librarys(tmp_path: Path) -> None:
    from bench_api import calibration_windows

    import llmq
    from llmq.data import calibration_windows as cut
    from llmq.data import tokenize

    text = tmp_path / "c.txt"
    text.write_text(tiny_text(20000))
    tok = tiny_tokenizer()
    recipe = llmq.Recipe().override({"calibration.source": str(text), "calibration.samples": 4,
                                     "calibration.seq_len": 64, "calibration.seed": 3,
                                     "smoothing.guard_windows": 0})
    got = calibration_windows(tok, recipe)
    ids = tokenize(tok, text.read_text(), max_tokens=8 * 4 * 64)  # how `llmq quantize` tokenizes
    assert torch.equal(got, cut(ids, 4, 64, 3))
    # with the guard, its held-out windows are drawn too and left out of calibration
    guarded = calibration_windows(tok, recipe.override({"smoothing.guard_windows": 2}))
    every = cut(tokenize(tok, text.read_text(), max_tokens=8 * 6 * 64), 6, 64, 3)
    assert guarded.shape == (4, 64) and all(any(torch.equal(g, e) for e in every) for g in guarded)


def _decode_result(name: str, tps: float, method: str | None, ratios: dict, gen: list[int]) -> dict:
    return {"prompt_tokens": 32, "new_tokens": 4, "repeats": 2, "warmup": 1, "prefill_seconds": 0.1,
            "prefill_tokens_per_second": 320.0, "decode_seconds_per_token": 1 / tps, "decode_tokens_per_second": tps,
            "generate_seconds": 1.0, "runs": [{"prefill_s": 0.1, "decode_s_per_token": 1 / tps, "generate_s": 1}] * 2,
            "peak_memory_bytes": 2**30, "baseline_memory_bytes": 2**29, "peak_memory_kind": "cpu-rss",
            "weight_memory_bytes": 1, "device": "cpu", "dtype": "x", "generated": gen, "deterministic": True,
            "int8_method": method, "protocol": "Decode speed at batch 1 ...", "ratios": ratios}


def test_decode_report_lines_caveats_target_and_plot(tmp_path: Path) -> None:
    import bench_decode
    from bench_plots import plot_decode

    wo = "weight-only"
    res = {"float32": _decode_result("float32", 10, None, {"bfloat16": 0.5}, [1, 2, 3, 4]),
           "bfloat16": _decode_result("bfloat16", 20, None, {"float32": 2.0}, [1, 2, 3, 5]),
           f"{wo}+float32": _decode_result("w", 4, wo, {"float32": 0.4, "bfloat16": 0.2}, [1, 2, 3, 4]),
           f"{wo}+bfloat16": _decode_result("w", 6, wo, {"float32": 0.6, "bfloat16": 0.3}, [1, 9, 9, 9])}
    sq = {k.replace("weight-only", "smoothquant-auto"): dict(v, int8_method="smoothquant" if "+" in k else None)
          for k, v in res.items()}
    sq["smoothquant-auto+bfloat16"]["ratios"] = {"float32": 2.2, "bfloat16": 1.1}
    results = {f"decode-{n}": {"kind": "decode", "results": r, "bases": ["float32", "bfloat16"],
                               "loadavg_1min": [1.0, 1.5]} for n, r in (("weight-only", res), ("smoothquant-auto", sq))}
    rows = bench_decode.decode_rows(results, "bfloat16")
    assert [(r["model"], r["rest"]) for r in rows[:2]] == [("float32", "float32"), ("bfloat16", "bfloat16")]
    assert rows[0]["groups"] == 2 and len(rows) == 6
    line = next(r for r in rows if r["model"] == wo and r["rest"] == "bfloat16")
    assert line["ratio_half"] == 0.3 and line["greedy_equal_fp32"] == 1
    notes = bench_decode.caveats(rows)
    assert any("weight-only int8 decodes at 0.20x" in n for n in notes)
    assert not any("smoothquant-auto` with bfloat16" in n for n in notes)  # 1.1x: not slower
    t = bench_decode.target(rows)
    assert t["met"] and "bfloat16 rest 1.10" in t["value"]
    text = "\n".join(bench_decode.markdown(rows, "img/x.png"))
    assert "decode / bfloat16 (same process)" in text and "Where int8 decodes slower" in text
    plot_decode(rows, tmp_path / "d.png", "t")
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_fidelity_spread_over_texts_and_seeds() -> None:
    from bench_report import fidelity_markdown, fidelity_rows

    def q(data, seed, ppl, kl=None, top1=None):
        return {"data": data, "seed": seed, "perplexity": ppl, "kl_divergence": kl, "top1_agreement": top1,
                "tokens": 100}

    results = {"fp32": {"kind": "fp", "quality": [q("wiki", 0, 20.0), q("other.txt", 0, 40.0)]},
               "sq": {"kind": "llmq", "quality": [q("wiki", 0, 21.0, 0.01, 0.9), q("other.txt", 0, 42.0, 0.02, 0.8),
                                                  q("wiki", 1, 22.0, 0.03, 0.7), q("other.txt", 1, 44.0, 0.04, 0.6)]}}
    rows = fidelity_rows(results)
    sq_other = next(r for r in rows if r["row"] == "sq" and r["data"] == "other.txt")
    assert sq_other["seeds"] == [0, 1] and sq_other["ppl_ratio"] == [1.05, 1.1]
    text = "\n".join(fidelity_markdown(rows))
    assert "| sq | other.txt | 100 | 0, 1 | 3.00e-02 (2.00e-02 to 4.00e-02) | 70.00% (60.00% to 80.00%)" in text


def test_scripts_stay_small_and_shell_is_clean() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in SCRIPTS.glob("*.py")}
    assert max(sizes.values()) <= 400, sizes
    sh = SCRIPTS / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(sh)], capture_output=True).returncode == 0


def test_raw_json_names_evaluation_peaks_as_process_peaks() -> None:
    """A benchmark row evaluates with the FP32 model resident (the speed comparison), so the JSON must not
    call that peak the int8 model's `peak_memory_bytes` (issue: int8 peak shown above the FP reference's)."""
    import bench_report

    ev = {"perplexity": 2.0, "peak_memory_bytes": 30, "baseline_memory_bytes": 10}
    raw = bench_report._process_peaks({"fp32": {"eval": dict(ev)}, "w8a8": {"eval": dict(ev), "quality": [dict(ev)]},
                                       "decode-w8a8": {"decode": {"x": 1}}})
    text = json.dumps(raw)
    assert '"peak_memory_bytes"' not in text and '"baseline_memory_bytes"' not in text
    assert raw["w8a8"]["quality"][0]["process_peak_memory_bytes"] == 30
    assert raw["w8a8"]["eval"]["process_peak_note"] == bench_report.PEAK_NOTE
    assert raw["decode-w8a8"] == {"decode": {"x": 1}} and ev["peak_memory_bytes"] == 30  # inputs untouched


def test_choices_table_names_storage_and_the_guards_pick_per_seed() -> None:
    from bench_choices import choice_markdown, choice_rows

    guard = {"chosen": "alpha 0", "held_out_tokens": 1022,
             "candidates": {"auto": {"kl_divergence": 0.02}, "alpha 0": {"kl_divergence": 0.01}}}
    storage = {"dtype": "float16", "value_max": 2.5e4}
    results = {"fp32": {"kind": "fp"},
               "sq": {"kind": "llmq", "recipe": {"calibration": {"seed": 0}},
                      "quantize": {"storage": storage, "guard": guard},
                      "spread": [{"seed": 1, "storage": {"dtype": "bfloat16", "value_max": None}, "guard": None}]},
               "rtn": {"kind": "llmq", "skipped": "no recipe"}}
    rows = choice_rows(results)
    assert [(r["row"], r["seed"]) for r in rows] == [("sq", 0), ("sq", 1)]
    text = "\n".join(choice_markdown(rows))
    assert "| sq | 0 | float16 (max 2.5e+04) | alpha 0 | auto 0.02, alpha 0 0.01 (1022) |" in text
    assert "| sq | 1 | bfloat16 | - | - |" in text
    assert choice_markdown([{"row": "x", "seed": 0, "storage": None, "guard": None}]) == []


@pytest.mark.parametrize("rotate, rotation, label", [
    ("auto", None, ""),                           # auto left it unrotated (a tied model)
    ("auto", {"kind": "hadamard"}, ", residual stream rotated"),
    (True, {"kind": "hadamard"}, ", residual stream rotated"),
    ("auto", "absent", ", rotate auto"),          # a row measured before runs recorded it: say only what it asked
    (False, "absent", ""),
])
def test_row_description_says_what_the_run_did_about_rotation(rotate, rotation, label) -> None:
    """The GPU run's report called SmolLM2's `rotate: auto` rows rotated, though auto leaves a tied model alone."""
    import bench_report

    q = {"threshold": 6.0} if rotation == "absent" else {"threshold": 6.0, "rotation": rotation}
    row = {"kind": "llmq", "quantize": q, "recipe_file": "configs/llm-int8.yaml",
           "recipe": {"quantization": {"method": "llm-int8", "skip": ["lm_head"], "rotate": rotate}}}
    assert bench_report.describe(row) == f"llmq `llm-int8` (threshold 6){label}, configs/llm-int8.yaml"


def test_gpu_summary_reads_the_evaluation_peak_the_report_renamed(tmp_path: Path) -> None:
    """gpu_summary.py printed 0 MiB for every row: bench_report stores the evaluation peak as process_*."""
    import bench_report
    from gpu_summary import bench

    ev = {"peak_memory_bytes": 900 * 2**20, "baseline_memory_bytes": 0, "peak_reserved_bytes": 1000 * 2**20,
          "peak_memory_kind": "cuda"}
    row = {"row": "w8a8", "what": "x", "perplexity": 2.0, "perplexity_ratio": 1.0, "kl": 0.01, "top1": 0.9,
           "weight_memory_bytes": 2**20, "eval_tokens_per_s": 1.0, "ratio_to_fp32": 1.0}
    summary = {"rows": [row], "raw": bench_report._process_peaks({"w8a8": {"eval": ev}})}
    (tmp_path / "bench-m.json").write_text(json.dumps(summary))
    (got,) = bench(tmp_path)["rows"]
    assert got["eval_peak_vram_mib"] == 900 and got["eval_peak_reserved_mib"] == 1000
