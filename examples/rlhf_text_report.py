"""The report of ``examples/rlhf_text.py``: ``summary.json``, ``summary.md`` and ``curves.png`` from ``OUT/raw``.

The ``## Findings`` section of an existing ``summary.md`` is written by hand and kept when the rest is rewritten.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

FINDINGS = "## Findings"
PLACEHOLDER = f"{FINDINGS}\n\n(to be written from the numbers below)\n"


def load(out: Path) -> list[dict[str, Any]]:
    """Every seed's raw result, by seed."""
    return sorted((json.loads(p.read_text()) for p in (out / "raw").glob("seed_*.json")), key=lambda r: r["seed"])


def cell(values: list[float] | np.ndarray, digits: int = 2) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def peak(curve: list[dict[str, float]]) -> dict[str, float]:
    """The evaluation with the highest gold score."""
    return max(curve, key=lambda point: point["gold"])


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and standard deviations over seeds of what the summary reports."""
    labels = list(results[0]["runs"])
    keys = ("gold", "proxy", "kl", "topic", "odd_pairs", "repeats", "distinct")
    summary: dict[str, Any] = {
        "seeds": [r["seed"] for r in results],
        "sft_held_out_nats": [r["sft"]["history"][-1]["held_out"] for r in results],
        "uniform_nats": results[0]["sft"]["uniform_nats"],
        "reward_model": {
            key: [r["reward_model"][key] for r in results]
            for key in ("held_out_accuracy", "held_out_accuracy_noiseless", "train_accuracy", "proxy_gold_correlation")
        },
        "sft": {key: [r["sft"]["stats"][key] for r in results] for key in keys},
        "runs": {},
    }
    for label in labels:
        runs = [r["runs"][label] for r in results if label in r["runs"]]
        summary["runs"][label] = {
            "seeds": len(runs),
            "final": {key: [run["final"][key] for run in runs] for key in keys},
            "peak_gold": [peak(run["curve"])["gold"] for run in runs],
            "kl_at_peak_gold": [peak(run["curve"])["kl"] for run in runs],
            "final_beta": [run["curve"][-1]["beta"] for run in runs],
            "seconds": [run["seconds"] for run in runs],
        }
    return summary


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Proxy and gold against KL to the SFT model (Gao et al.'s axes), and KL over training, per beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results[0]["runs"])
    colors = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for label in labels:
        curves = [r["runs"][label]["curve"] for r in results if label in r["runs"]]
        n = min(len(c) for c in curves)
        mean = {key: np.mean([[p[key] for p in c[:n]] for c in curves], axis=0) for key in ("kl", "gold", "proxy")}
        mean["kl"] = np.maximum(mean["kl"], 0.0)
        steps = [p["step"] for p in curves[0][:n]]
        for curve in curves:  # each seed thin, the mean over seeds thick
            kl = [max(p["kl"], 0.0) for p in curve]  # float error can make the first KL -1e-7: no sqrt of it
            axes[0].plot(np.sqrt(kl), [p["proxy"] for p in curve], color=colors[label], alpha=0.25, lw=0.8)
            axes[1].plot(np.sqrt(kl), [p["gold"] for p in curve], color=colors[label], alpha=0.25, lw=0.8)
            axes[2].plot([p["step"] for p in curve], kl, color=colors[label], alpha=0.25, lw=0.8)
        axes[0].plot(np.sqrt(mean["kl"]), mean["proxy"], "o-", color=colors[label], ms=3, label=label)
        axes[1].plot(np.sqrt(mean["kl"]), mean["gold"], "o-", color=colors[label], ms=3, label=label)
        axes[2].plot(steps, mean["kl"], "o-", color=colors[label], ms=3, label=label)
    sft_gold = np.mean([r["sft"]["stats"]["gold"] for r in results])
    axes[1].axhline(sft_gold, color="grey", ls=":", lw=1, label="SFT")
    axes[0].axhline(0.0, color="grey", ls=":", lw=1, label="SFT")
    top = max(max(p["kl"] for r in results for run in r["runs"].values() for p in run["curve"]), 1.0)
    ticks = [t for t in (0, 1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 144, 196, 256) if t <= top * 1.1]
    for ax, ylabel in zip(axes[:2], ("proxy score (learned reward model, SFT std units)", "gold score"), strict=True):
        # Gao et al. plot against sqrt(KL); the ticks say the KL itself
        ax.set_xticks(np.sqrt(ticks), [str(t) for t in ticks])
        ax.set_xlabel("KL(pi || pi_SFT) per continuation, nats (square-root axis)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("fine-tuning env steps (tokens)")
    axes[2].set_ylabel("KL(pi || pi_SFT) per continuation, nats")
    axes[2].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("what PPO maximises")
    axes[1].set_title("what the hidden reader thinks")
    axes[2].set_title("drift from the SFT model")
    fig.suptitle(f"RLHF on CPython's documentation: {len(results)} seed(s), thin lines single seeds, thick the mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict[str, Any]], summary: dict[str, Any], findings: str) -> str:
    """The summary page: findings (by hand), tables, samples at each stage."""
    budget = results[0]["budget"]
    rm = summary["reward_model"]
    n = len(results)
    lines = [
        "# RLHF on text in miniature: SFT, a reward model from preferences, PPO with a KL penalty",
        "",
        f"`python examples/rlhf_text.py --full` ({n} seed(s): {', '.join(map(str, summary['seeds']))}). What each "
        "stage is: the docstring of `examples/rlhf_text.py`. Every number is the mean ± standard deviation over "
        f"seeds of {budget['n_eval']} sampled continuations of held-out prompts (16 tokens each); KL is the exact "
        "KL(pi || pi_SFT) summed over a continuation's 16 states, in nats.",
        "",
        findings.strip(),
        "",
        "![proxy and gold score against KL to the SFT model, per beta](curves.png)",
        "",
        "## Stages",
        "",
        f"- **SFT**: held-out {cell(summary['sft_held_out_nats'])} nats per token after {budget['sft_epochs']} "
        f"epochs (uniform over the vocabulary: {summary['uniform_nats']:.2f}).",
        f"- **Reward model** on {results[0]['reward_model']['train_pairs']} labelled pairs of SFT continuations: "
        f"held-out accuracy {cell(rm['held_out_accuracy'], 3)} against the (noisy) labels, "
        f"{cell(rm['held_out_accuracy_noiseless'], 3)} against the gold score's own order; "
        f"train accuracy {cell(rm['train_accuracy'], 3)}; correlation of proxy and gold scores on SFT samples "
        f"{cell(rm['proxy_gold_correlation'])}.",
        f"- **Fine-tuning**: {budget['timesteps']} env steps (tokens) per beta, {budget['n_envs']} envs, the "
        f"penalty in the reward; adaptive: Ziegler et al.'s controller, target {budget['kl_target']} nats per token "
        f"({budget['kl_target'] * 16:g} per continuation), starting at beta = 0.1.",
        "",
        "## At the end of fine-tuning",
        "",
        "| run | gold | proxy | KL (nats) | peak gold (KL there) | topic words | odd pairs | repeats | distinct "
        "words | beta at the end | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sft = summary["sft"]
    lines.append(
        f"| SFT | {cell(sft['gold'])} | {cell(sft['proxy'])} | 0 | | {cell(sft['topic'])} | {cell(sft['odd_pairs'])} | "
        f"{cell(sft['repeats'])} | {cell(sft['distinct'])} | | |"
    )
    for label, run in summary["runs"].items():
        final = run["final"]
        lines.append(
            f"| {label} | {cell(final['gold'])} | {cell(final['proxy'])} | {cell(final['kl'], 1)} | "
            f"{cell(run['peak_gold'])} ({cell(run['kl_at_peak_gold'], 1)}) | {cell(final['topic'])} | "
            f"{cell(final['odd_pairs'])} | {cell(final['repeats'])} | {cell(final['distinct'])} | "
            f"{cell(run['final_beta'], 3)} | {cell(run['seconds'], 0)} |"
        )
    lines += [
        "",
        "Gold = topic words - odd pairs - repeats. Peak gold: the best of the evaluations during fine-tuning "
        f"(every {budget['timesteps'] // budget['evals']} steps; those evaluations sample the same prompts with "
        "another random stream than the columns of this table, so at small changes the two can disagree).",
        "",
        "## Over training (mean over seeds)",
        "",
    ]
    for label in summary["runs"]:
        curves = [r["runs"][label]["curve"] for r in results if label in r["runs"]]
        count = min(len(c) for c in curves)
        lines += [
            f"**{label}**",
            "",
            "| steps | gold | proxy | KL | topic words | odd pairs | repeats | distinct words | beta |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i in range(count):
            points = [c[i] for c in curves]

            def mean(key: str, points: list[dict[str, float]] = points) -> float:
                return float(np.mean([p[key] for p in points]))

            lines.append(
                f"| {points[0]['step']} | {mean('gold'):.2f} | {mean('proxy'):.2f} | {mean('kl'):.1f} | "
                f"{mean('topic'):.2f} | {mean('odd_pairs'):.2f} | {mean('repeats'):.2f} | {mean('distinct'):.2f} | "
                f"{mean('beta'):.3g} |"
            )
        lines.append("")
    lines += [
        "## Samples",
        "",
        "Seed 0, the same held-out prompts (in brackets) at each stage; the first samples drawn, not chosen.",
        "",
    ]
    first = results[0]
    for title, shown in [("SFT", first["sft"]["samples"])] + [
        (f"after fine-tuning, {label}", run["samples"]) for label, run in first["runs"].items()
    ]:
        lines += [f"**{title}**", ""]
        lines += [f"- [{s['prompt']}] {s['text']}" for s in shown]
        lines.append("")
    return "\n".join(lines)


def report(out: Path) -> None:
    """Write ``summary.json``, ``summary.md`` (keeping its hand-written findings) and ``curves.png``."""
    results = load(out)
    if not results:
        return
    summary = summarise(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    findings = PLACEHOLDER
    existing = out / "summary.md"
    if existing.exists():
        match = re.search(rf"{FINDINGS}\n.*?(?=\n!\[)", existing.read_text(), flags=re.S)
        if match:
            findings = match.group(0)
    existing.write_text(markdown(results, summary, findings) + "\n")
    plot(results, out / "curves.png")
    print(f"wrote {out}/summary.md, summary.json and curves.png ({len(results)} seed(s))")
