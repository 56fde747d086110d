"""report.md and report.html of a demo run: what a platform team looks at first.

Sections: the reward model's GAUC against its baselines and the oracle ceiling; reward and oracle
utility per online round (plot); base vs aligned images (several merchants on one prompt and seed, and
held-out requests); the fidelity check; where the time went. Figures are PNG files beside the reports
(report_files/), referenced by both.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FILES = "report_files"


@dataclass
class ReportInputs:
    metrics: dict[str, float]  # the flat metrics.json of the run
    rm_table: dict[str, dict[str, dict[str, float]]]  # scorer -> seen/cold -> metric -> value
    rounds: list[dict]  # per-round metrics of the online loop
    stage_seconds: dict[str, float]  # wall time per demo stage
    grids: dict[str, np.ndarray] = field(default_factory=dict)  # caption -> uint8 image
    notes: list[str] = field(default_factory=list)  # facts worth a line (sizes, paths, partitions)
    machine: str = ""


PANELS = (("probe_utility", "probe utility: fixed held-out requests and noise (gold)"),
          ("probe_proxy", "RM reward of the probe (proxy)"),
          ("rm_reward", "RM reward (on-policy groups)"),
          ("loss", "group objective loss"))


def plot_rounds(rounds: list[dict], path: Path) -> None:
    """Per round: the probe set's gold utility (the learning curve) and RM reward, the RM reward of the
    round's own groups, and the loss; 3-round means where there are enough rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = [m["round"] for m in rounds]
    panels = [(key, title) for key, title in PANELS if any(key in m for m in rounds)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        values = np.array([m.get(key, np.nan) for m in rounds], dtype=float)
        axis.plot(index, values, marker="o", alpha=0.6, label="round")
        if len(values) >= 3:  # each round draws new requests: the trend is easier to see smoothed
            smooth = np.convolve(values, np.ones(3) / 3, mode="valid")
            axis.plot(index[1:-1], smooth, linestyle="--", color="black", label="3-round mean")
            axis.legend(fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _save_image(array: np.ndarray, path: Path, scale: int = 3) -> None:
    from PIL import Image

    image = Image.fromarray(array)
    image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST).save(path)


def _rm_rows(table: dict) -> list[tuple[str, str, str, str, str]]:
    names = {"perfusion_rm": "PerFusionRM", "no_plugin": "plug-in off", "clip_zero_shot": "CLIP zero-shot",
             "random": "random", "oracle": "oracle ceiling", "oracle_side_features": "side-feature oracle"}
    return [(names.get(scorer, scorer), f"{subsets['seen']['gauc']:.3f}", f"{subsets['cold']['gauc']:.3f}",
             f"{subsets['seen']['map']:.3f}", f"{subsets['cold']['map']:.3f}") for scorer, subsets in table.items()]


def _alignment_rows(metrics: dict) -> list[tuple[str, str, str, str, str]]:
    from perfusion_ray.evaluation.alignment import win_rate_text

    rows = []
    for by in ("oracle", "judge"):
        for split, suffix in (("seen merchants", ".seen"), ("cold-start merchants", ".cold")):
            if f"align.{by}.win_rate{suffix}" in metrics:
                rows.append((f"{split} ({by})", f"{metrics[f'align.{by}.utility.base{suffix}']:.3f}",
                             f"{metrics[f'align.{by}.utility.aligned{suffix}']:.3f}", win_rate_text(metrics, suffix, by),
                             f"{metrics.get(f'align.{by}.personalization{suffix}', float('nan')):+.3f}"))
    return rows


def _fidelity_rows(metrics: dict) -> list[tuple[str, str, str]]:
    rows = [("class accuracy", f"{metrics['align.fidelity.class_acc.base']:.1%}",
             f"{metrics['align.fidelity.class_acc']:.1%}")] if "align.fidelity.class_acc" in metrics else []
    if "align.fidelity.colour_acc" in metrics:
        rows.append(("requested colour is dominant", f"{metrics['align.fidelity.colour_acc.base']:.1%}",
                     f"{metrics['align.fidelity.colour_acc']:.1%}"))
    return rows


def round_rows(rounds: list[dict]) -> list[tuple]:
    """One row per round, in the columns of TABLES['rounds'] (the report and `perfusion align` print it)."""
    return [(m["round"], _number(m.get("probe_utility")), _number(m.get("probe_proxy")), f"{m['rm_reward']:.3f}",
             _number(m.get("oracle_utility")), f"{m['loss']:.3f}",
             m["fresh_partitions"], f"{m['generate_seconds']:.0f}", f"{m['score_seconds']:.1f}",
             f"{m['optimize_seconds']:.0f}", f"{m['rm_refresh_seconds']:.0f}", m.get("rm_version", ""))
            for m in rounds]


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


TABLES = {
    "rm": ("held-out groups", "GAUC seen", "GAUC cold", "MAP seen", "MAP cold"),
    "align": ("held-out requests", "utility base", "utility aligned", "win rate (95% interval)", "personalization"),
    "fidelity": ("fidelity", "base", "aligned"),
    "rounds": ("round", "probe utility", "probe RM reward", "RM reward", "oracle utility", "loss",
               "fresh partitions", "generate s", "score s", "optimize s", "RM refresh s", "RM version"),
    "time": ("stage", "seconds"),
}


def _markdown_table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: tuple, rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sections(inputs: ReportInputs, figures: dict[str, str]) -> list[tuple[str, str, list]]:
    """(title, kind, payload) in reading order; kind is table, figure or text."""
    m = inputs.metrics
    from perfusion_ray.evaluation.alignment import primary_judge

    by = primary_judge(m)
    ahead = {split: m[f"align.{by}.utility.aligned.{split}"] > m[f"align.{by}.utility.base.{split}"]
             for split in ("seen", "cold") if f"align.{by}.utility.base.{split}" in m}
    verdict = (f"The aligned policy is ahead of the base by the {by} for seen and cold-start merchants."
               if all(ahead.values()) else
               f"The aligned policy is NOT ahead of the base by the {by} for: "
               + ", ".join(split for split, ok in ahead.items() if not ok) + ".")
    if "align.agreement.rank_correlation" in m:
        verdict += (f" The judge (an RM trained on held-out feedback only) agrees with the oracle at rank correlation "
                    f"{m['align.agreement.rank_correlation']:+.2f} of per-request gains; its win rate differs by "
                    f"{m.get('align.agreement.win_rate_difference', float('nan')):+.1%}.")
    sections = [
        ("Summary", "text", [verdict] + inputs.notes),
        ("Reward model on held-out groups", "table", [TABLES["rm"], _rm_rows(inputs.rm_table)]),
        ("Online rounds", "figure", [figures["rounds"], "probe utility (gold), probe RM reward (proxy), RM reward of "
                                                        "each round's groups and loss, per round"]),
        ("Per round", "table", [TABLES["rounds"], round_rows(inputs.rounds)]),
        ("Aligned vs base on held-out requests", "table", [TABLES["align"], _alignment_rows(m)]),
        ("Fidelity check (reward hacking would show here)", "table", [TABLES["fidelity"], _fidelity_rows(m)]),
    ]
    for caption, name in figures.items():
        if name != figures["rounds"]:
            sections.append((caption, "figure", [name, caption]))
    sections.append(("Where the time went", "table",
                     [TABLES["time"], [(stage, f"{s:.0f}") for stage, s in inputs.stage_seconds.items()]]))
    if inputs.machine:
        sections.append(("Machine", "text", [inputs.machine]))
    return sections


def write_report(inputs: ReportInputs, out: Path) -> tuple[Path, Path]:
    """Write out/report.md, out/report.html and their figures; returns the two report paths."""
    from perfusion_ray.storage import atomic_write_bytes

    files = out / FILES
    files.mkdir(parents=True, exist_ok=True)
    figures = {"rounds": f"{FILES}/rounds.png"}
    plot_rounds(inputs.rounds, out / figures["rounds"])
    for i, (caption, grid) in enumerate(inputs.grids.items()):
        name = f"{FILES}/grid-{i}.png"
        _save_image(grid, out / name)
        figures[caption] = name
    sections = _sections(inputs, figures)
    markdown, body = ["# PerFusion demo report"], []
    for title, kind, payload in sections:
        markdown.append(f"\n## {title}\n")
        body.append(f"<h2>{html.escape(title)}</h2>")
        if kind == "table":
            markdown.append(_markdown_table(*payload))
            body.append(_html_table(*payload))
        elif kind == "figure":
            markdown.append(f"![{payload[1]}]({payload[0]})")
            body.append(f'<figure><img src="{payload[0]}" alt="{html.escape(payload[1])}">'
                        f"<figcaption>{html.escape(payload[1])}</figcaption></figure>")
        else:
            markdown += [f"- {line}" for line in payload]
            body.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in payload) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{image-rendering:pixelated;max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>PerFusion demo report</title>"
            f"<style>{style}</style></head><body><h1>PerFusion demo report</h1>{''.join(body)}</body></html>")
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(str(md_path), ("\n".join(markdown) + "\n").encode())
    atomic_write_bytes(str(html_path), page.encode())
    return md_path, html_path
