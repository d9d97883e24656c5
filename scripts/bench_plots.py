"""The plots of scripts/benchmark.py's report: perplexity vs alpha (simulated W8A8), memory vs perplexity,
and decode tokens/s per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mode_words(d: dict[str, Any]) -> str:
    act = {"token": "per-token dynamic", "tensor": "per-tensor dynamic", "static": "per-tensor static"}[d["act"]]
    return f"{act} act, per-{d['weight']} weights"


def plot_alpha(sim: dict[str, Any], path: Path, title: str) -> None:
    """Left: every point, log scale; right: the region within 1.5x FP32, linear."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    fp = next(iter(sim.values()))["fp_perplexity"]
    for ax in axes:
        for i, (m, d) in enumerate(sim.items()):
            c = f"C{i}"
            pts = [(float(k), p["perplexity"]) for k, p in d["points"].items() if k != "auto"]
            ax.plot(*zip(*pts, strict=True), "o-", color=c, ms=3, label=f"{m} ({_mode_words(d)})")
            ax.axhline(d["points"]["0.0"]["perplexity"], color=c, ls="--", lw=0.8)
            if "auto" in d["points"]:
                a = d["points"]["auto"]
                ax.plot(a["mean_alpha"], a["perplexity"], "*", color=c, ms=13, mec="k")
        ax.axhline(fp, color="k", ls=":", lw=1.2, label=f"FP32 {fp:.2f}")
        ax.set_xlabel("alpha (the same on every smoothing group)")
        ax.grid(alpha=0.3, which="both")
    axes[0].plot([], [], "k--", lw=0.8, label="naive (alpha 0), per mode")
    axes[0].plot([], [], "*", color="gray", mec="k", ms=11, ls="", label="per-group auto alpha (at its mean)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("perplexity (log scale)")
    axes[0].set_title("all points", fontsize=10)
    axes[0].legend(fontsize=7)
    axes[1].set_ylim(fp * 0.98, fp * 1.5)
    axes[1].set_ylabel("perplexity")
    axes[1].set_title("zoom: up to 1.5x FP32", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    labels: dict[tuple[float, float], list[str]] = {}
    for i, r in enumerate(r for r in rows if not r.get("skipped")):
        x, y = r["weight_memory_bytes"] / MIB, r["perplexity"]
        ax.plot(x, y, "o", color=f"C{i % 10}", ms=7)
        ax.plot(r["checkpoint_bytes"] / MIB, y, "s", color=f"C{i % 10}", ms=11, mfc="none")
        labels.setdefault((round(x, 1), round(y, 3)), []).append(r["row"])
    for (x, y), names in labels.items():  # identical results (e.g. llm-int8 and the peer) share one label
        ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(7, 4), fontsize=8)
    ax.plot([], [], "ko", label="weights in RAM (params, buffers, int8 state)")
    ax.plot([], [], "ks", mfc="none", ms=9, label="checkpoint on disk (safetensors)")
    ax.set_xlabel("MiB")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Decode and prefill tokens/s per model (medians; whiskers: slowest and fastest timed run), FP bases
    dashed; each int8 bar is labelled with its same-process ratio to the 16-bit base."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    labels = [r["model"] if r["fp"] else f"{r['model']} ({r['rest']} rest)" for r in rows]
    colors = {rest: f"C{i}" for i, rest in enumerate(dict.fromkeys(r["rest"] for r in rows))}
    for ax, key, lo, hi, name in ((axes[0], "decode_tokens_per_s", "decode_min", "decode_max", "decode"),
                                  (axes[1], "prefill_tokens_per_s", "prefill_min", "prefill_max", "prefill")):
        for i, r in enumerate(rows):
            v = r[key]
            ax.barh(i, v, color=colors[r["rest"]], alpha=0.45 if r["fp"] else 0.9,
                    xerr=[[v - r[lo]], [r[hi] - v]], ecolor="k", capsize=2)
            if name == "decode" and r.get("ratio_half") is not None and not r["fp"]:
                ax.annotate(f" {r['ratio_half']:.2f}x {r['half']}", (r[hi], i), va="center", fontsize=7)
        for r in rows:
            if r["fp"]:
                ax.axvline(r[key], color=colors[r["rest"]], ls="--", lw=0.8)
        ax.set_xlabel(f"{name} tokens/s (batch 1)")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_title("decode: one token at a time, KV cache", fontsize=10)
    axes[1].set_title("prefill: the prompt in one pass", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
