"""The demo report: the tables, plots and image grids a user opens first, in both formats."""

from __future__ import annotations

import numpy as np

from perfusion_ray.report import ReportInputs, write_report


def _inputs(aligned_cold: float) -> ReportInputs:
    metrics = {"align.oracle.utility.base.seen": 0.50, "align.oracle.utility.aligned.seen": 0.60,
               "align.oracle.win_rate.seen": 0.7, "align.oracle.win_rate": 0.68,
               "align.oracle.personalization.seen": 0.1, "align.oracle.utility.base.cold": 0.55,
               "align.oracle.utility.aligned.cold": aligned_cold, "align.oracle.win_rate.cold": 0.6,
               "align.oracle.personalization.cold": 0.05, "align.fidelity.class_acc.base": 0.97,
               "align.fidelity.class_acc": 0.96, "align.fidelity.colour_acc.base": 1.0, "align.fidelity.colour_acc": 1.0}
    subsets = {"seen": {"gauc": 0.78, "map": 0.8}, "cold": {"gauc": 0.76, "map": 0.79}}
    rounds = [{"round": r, "rm_reward": 1.0 + r, "oracle_utility": 0.5 + 0.01 * r, "loss": 1.3, "fresh_partitions": 2,
               "generate_seconds": 8.0, "score_seconds": 0.1, "optimize_seconds": 20.0, "rm_refresh_seconds": 0.0,
               "rm_version": f"v{r}"} for r in range(3)]
    grid = np.zeros((36, 72, 3), np.uint8)
    return ReportInputs(metrics, {"perfusion_rm": subsets, "oracle": subsets}, rounds, {"simulate": 5.0},
                        {"one prompt, several merchants": grid}, ["48 merchants"], "test machine")


def test_report_has_the_gauc_table_round_plot_grids_and_fidelity_in_md_and_html(tmp_path):
    md, html = write_report(_inputs(aligned_cold=0.65), tmp_path)
    markdown, page = md.read_text(), html.read_text()
    for text in (markdown, page):
        assert "PerFusionRM" in text and "oracle ceiling" in text and "0.780" in text
        assert "report_files/rounds.png" in text and "report_files/grid-0.png" in text
        assert "class accuracy" in text and "96.0%" in text
        assert "ahead of the base by the oracle for seen and cold-start" in text
    assert (tmp_path / "report_files" / "rounds.png").stat().st_size > 1000
    assert (tmp_path / "report_files" / "grid-0.png").is_file()
    assert "<table>" in page and "| round |" in markdown


def test_report_says_plainly_when_the_aligned_policy_is_not_ahead(tmp_path):
    md, _ = write_report(_inputs(aligned_cold=0.50), tmp_path)
    assert "NOT ahead of the base by the oracle for: cold" in md.read_text()
