"""Present benchmark results: a terminal table, report.md, results.json and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runner import BenchResults, against_peers, summarize

COLUMNS = [
    ("run", "run", "{}"),
    ("category", "category", "{}"),
    ("median_latency_s", "median s", "{:.2f}"),
    ("latency_ratio", "latency x", "{:.2f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("acceptance_rate", "accept", "{:.0%}"),
    ("mean_accepted_length", "mean acc len", "{:.2f}"),
    ("target_passes_per_token", "passes/tok", "{:.2f}"),
    ("ideal_speedup", "ideal", "{:.2f}x"),
    ("of_ideal", "of ideal", "{:.0%}"),
    ("compute_ratio", "compute", "{:.0%}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
    ("identical", "identical", "{:.0%}"),
]


Columns = list[tuple[str, str, str]]  # (row key, title, format)
PEER_COLUMNS = [("run", "run", "{}"), ("peer", "against", "{}"), ("median", "median speedup", "{:.2f}x"),
                ("least", "least", "{:.2f}x"), ("prompts", "prompts", "{}")]


def table(rows: list[dict[str, Any]], columns: Columns = COLUMNS) -> list[list[str]]:
    body = [[_fmt(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    return [[title for _, title, _ in columns]] + body


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def terminal_table(rows: list[dict[str, Any]], columns: Columns = COLUMNS) -> str:
    cells = table(rows, columns)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], columns: Columns = COLUMNS) -> str:
    cells = table(rows, columns)
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in cells[0]) + "|")
    return "\n".join(lines)


def write_report(results: BenchResults, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md"}
    paths["json"].write_text(json.dumps(results.to_dict(), indent=2))
    paths.update(_plots(rows, out_dir))
    paths["markdown"].write_text(_markdown(results, rows, paths))
    return paths


def _markdown(results: BenchResults, rows: list[dict[str, Any]], paths: dict[str, Path]) -> str:
    config = results.config
    lines = [
        "# specdec benchmark",
        "",
        " ".join(f"**{k}**: {v}" for k, v in config.items() if k != "command"),
        "",
        f"Command: `{config.get('command', '')}`",
        "",
        "Ratios are against `specdec-plain` (specdec's own loop with drafting off) on the same prompts, "
        "interleaved per prompt; latency is the median over repeats, then over prompts. "
        "`compute` is estimated FLOPs (2 per multiplying weight per processed position, draft + target, "
        "rejected positions included) per output token relative to the baseline. `identical`: share of "
        "greedy outputs token-for-token equal to the baseline's. `peak MB` on CPU is the process's peak RSS.",
        "",
        markdown_table(rows),
        "",
    ]
    if peers := against_peers(results):
        lines += ["Against each peer, prompt by prompt: the peer's time per token over the run's (median over "
                  "prompts, and the least):", "", markdown_table(peers, PEER_COLUMNS), ""]
    if config.get("verify_cost_ms"):
        curve = ", ".join(f"{n}: {t:.1f}" for n, t in enumerate(config["verify_cost_ms"], 1))
        drafts = ", ".join(f"{run}: {t:.2f} ms" for run, t in config.get("draft_cost_ms", {}).items()) or "-"
        lines += [
            f"Verify-cost curve on this backend, ms for a pass with logits at n positions: {curve}. "
            f"Draft cost per token: {drafts}. `ideal` is the seed's S(alpha, k) = E[tokens per pass] x T(1) / "
            "(T(k+1) + k x t_draft) at the run's measured acceptance, with acceptance independent per position "
            "and the best k for adaptive runs (bench/ideal.py); the n-gram drafter's bursty acceptance can beat it.",
            "",
        ]
    for name in ("speedup", "acceptance_by_position", "speedup_vs_k"):
        if name in paths:
            lines += [f"![{name}]({paths[name].name})", ""]
    return "\n".join(lines)


def _plots(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    by_category = [r for r in rows if r["category"] != "all"]
    categories = sorted({r["category"] for r in by_category})
    runs = list(dict.fromkeys(r["run"] for r in by_category))
    fig, (ax_speed, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        xs = [c + i * width for c in range(len(categories))]
        lookup = {r["category"]: r for r in by_category if r["run"] == run}
        ax_speed.bar(xs, [lookup.get(c, {}).get("speedup") or 0 for c in categories], width, label=run)
        ax_acc.bar(xs, [lookup.get(c, {}).get("acceptance_rate") or 0 for c in categories], width, label=run)
    for ax, title in ((ax_speed, "speedup vs specdec-plain"), (ax_acc, "acceptance rate")):
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories)
        ax.set_title(title)
    ax_speed.axhline(1.0, color="grey", lw=0.8)
    ax_speed.legend(fontsize=7)
    fig.tight_layout()
    paths["speedup"] = out_dir / "speedup_by_category.png"
    fig.savefig(paths["speedup"], dpi=110)
    plt.close(fig)

    positional = [r for r in rows if r["category"] == "all" and r.get("per_position_acceptance")]
    if positional:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in positional:
            values = r["per_position_acceptance"]
            ax.plot(range(1, len(values) + 1), values, marker="o", label=r["run"])
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["acceptance_by_position"] = out_dir / "acceptance_by_position.png"
        fig.savefig(paths["acceptance_by_position"], dpi=110)
        plt.close(fig)

    swept = [r for r in rows if r["category"] == "all" and " k=" in r["run"]]
    if len({r["run"] for r in swept}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        families: dict[str, list[tuple[int, float]]] = {}
        for r in swept:
            family, k = r["run"].rsplit(" k=", 1)
            if k.isdigit():
                families.setdefault(family, []).append((int(k), r["speedup"]))
        for family, points in families.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
        ax.set_xlabel("draft tokens k")
        ax.set_ylabel("speedup")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["speedup_vs_k"] = out_dir / "speedup_vs_k.png"
        fig.savefig(paths["speedup_vs_k"], dpi=110)
        plt.close(fig)
    return paths
