"""The `perfusion` command line: thin wrappers over the library.

Errors a user can fix print as one line plus a hint (exit 2); anything else is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from perfusion_ray.config import DEFAULT_CONFIG, PerfusionConfig, load_config, refuse_lost_outputs
from perfusion_ray.console import log_until_exit, quiet_libraries, say, table
from perfusion_ray.errors import PerfusionError
from perfusion_ray.storage import exists, join, local_directory, log_file, path_or_uri, write_json


def _config(args: argparse.Namespace, *writes: str) -> PerfusionConfig:
    """The command's config. `writes` names the config's output fields this command writes: under `ray job
    submit --working-dir` a relative one would land in the job's package and be lost, so it is refused."""
    config = load_config(args.config, args.set)
    outputs = {name: path for name, path in config.output_paths().items() if name in writes}
    for flag in ("out", "metrics"):
        if getattr(args, flag, None) is not None:
            outputs[f"--{flag}"] = getattr(args, flag)
    return refuse_lost_outputs(outputs, config)


_table = table


@contextmanager
def _logged(args: argparse.Namespace, log_file: Path):
    """A long command's console: our lines on the terminal, the libraries' output in `log_file` (--verbose:
    everything on the terminal)."""
    if not args.verbose:
        say(f"log: {log_file}")
    with quiet_libraries(log_file, args.verbose):
        yield


def _splits(value: str) -> list[str]:
    return ["train", "holdout"] if value == "both" else [value]


# ---------------------------------------------------------------- config
def cmd_config_docs(args: argparse.Namespace) -> int:
    from perfusion_ray.config_docs import generate
    from perfusion_ray.storage import atomic_write_bytes

    text = generate()
    if args.out is None:
        say(text)
        return 0
    atomic_write_bytes(args.out, text.encode())
    say(f"configuration reference: {args.out}")
    return 0


# ---------------------------------------------------------------- world
def cmd_world_simulate(args: argparse.Namespace) -> int:
    from perfusion_ray.environment import simulate

    config = _config(args, "data.root")
    for split in _splits(args.split):
        report = simulate(config, split)
        say(f"simulated {split}: {report.requests} requests, {report.events} events in "
              f"{len(report.partitions)} hourly partitions under {config.data.root}/{split}/feedback "
              f"({report.seconds:.1f}s); oracle GAUC ceiling {report.oracle_gauc:.3f}")
    return 0


# ---------------------------------------------------------------- data
def _print_ingest(report) -> None:
    c = report.counts
    if report.recovered_runs:
        say(f"recovered {len(report.recovered_runs)} committed run(s) missing from the watermark")
    if report.run_id is None:
        say(f"ingest {report.split}: no new partitions past the watermark")
        return
    say(f"ingest {report.split} run {report.run_id} ({report.engine}, {report.seconds:.1f}s): "
          f"{len(report.files)} partition file(s), {c.rows_read} rows read = {c.rows_grouped} grouped + "
          f"{c.rows_quarantined} quarantined; {c.groups} group examples; {c.files_quarantined} file(s) quarantined whole")


def cmd_data_ingest(args: argparse.Namespace) -> int:
    from perfusion_ray.data.ingest import ingest

    config = _config(args, "data.root")
    for split in _splits(args.split):
        _print_ingest(ingest(config, split, engine=args.engine))
    return 0


def _print_summary(summary) -> None:
    say(f"\n== {summary.split} ==")
    say(_table([
        ("partition files", summary.partition_files), ("consumed (watermark)", summary.consumed_files),
        ("pending", summary.pending_files), ("ingest runs", summary.ingest_runs),
        ("group examples", summary.groups), ("merchants", summary.merchants),
        ("groups with P and N", summary.groups_with_preference), ("groups all P", summary.groups_all_positive),
        ("groups all N", summary.groups_all_negative), ("quarantined rows", summary.quarantined_rows),
        ("quarantined files", summary.quarantined_files),
    ], ("", "count")))
    if summary.label_counts:
        say("\n" + _table([(f"{label:g}", n) for label, n in summary.label_counts.items()], ("label", "candidates")))
    if summary.quarantine_reasons:
        say("\n" + _table(list(summary.quarantine_reasons.items()), ("quarantine reason", "rows")))


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from perfusion_ray.data.summary import summarize

    config = _config(args)
    for split in _splits(args.split):
        _print_summary(summarize(config.data.root, split, config.data.label_policy))
    return 0


def cmd_data_adapt(args: argparse.Namespace) -> int:
    from perfusion_ray.data.adapters import adapt_file
    from perfusion_ray.data.store import StoreLayout

    config = _config(args, "data.root")
    report = adapt_file(args.kind, args.input, args.out, StoreLayout(config.data.root).images_uri, ties=args.ties)
    say(f"{args.kind}: {report.rows_read} rows read = {report.groups_written} groups + {report.ties_dropped} "
          f"ties dropped + {report.rows_rejected} rejected ({report.ties} ties); written to {args.out}")
    for reason, count in report.reasons.items():
        say(f"  rejected {count}: {reason}")
    return 0


# ---------------------------------------------------------------- pretraining of embedded models
def cmd_pretrain(args: argparse.Namespace) -> int:
    from perfusion_ray.environment import pretraining_command

    args.argv = sys.argv[3:]  # recorded with the weights as the reproducing command
    return pretraining_command(args.action)(args)


# ---------------------------------------------------------------- reward model
def _baseline_config(config: PerfusionConfig) -> PerfusionConfig:
    """The non-personalized baseline: the same config and code path with the plug-in off."""
    baseline = config.model_copy(deep=True)
    baseline.rm.plugin = False
    baseline.rm.out = join(config.rm.out, "no_plugin")
    return baseline


def cmd_rm_train(args: argparse.Namespace) -> int:
    from perfusion_ray.evaluation.judge import judge_out
    from perfusion_ray.train.reward_model import train_reward_model

    config = _config(args, "rm.out")
    runs = [("PerFusionRM", config, "train", None)]
    if args.with_baseline:
        runs.append(("plug-in-off baseline", _baseline_config(config), "train", None))
    if args.judge:  # the judge trains on held-out feedback only (evaluation/judge.py)
        runs = ([] if args.judge_only else runs) + [("judge (holdout split)", config, "holdout", judge_out(config))]
    with _logged(args, log_file(config.rm.out, "rm-train.log")):
        for kind, run_config, split, out in runs:
            say(f"training {kind} on the {split} split (Ray Train + DeepSpeed)")
            report = train_reward_model(run_config, resume=args.resume, split=split, out=out)
            say(f"{kind}: best validation GAUC {report.best_val_gauc:.3f} after {report.epochs} epoch(s), "
                f"{report.seconds:.0f}s; exported to {report.model_dir}")
    return 0


def _local_copy(folder: str | Path) -> Path:
    """A model folder as a local path (a URI: its verified cached copy), or one line when nothing is there."""
    try:
        return local_directory(folder)
    except FileNotFoundError as exc:
        raise PerfusionError(str(exc), hint="export one first (`perfusion rm train`, `perfusion align`)") from None


def cmd_rm_eval(args: argparse.Namespace) -> int:
    from perfusion_ray.environment import build_environment
    from perfusion_ray.evaluation.reward_model import evaluate_reward_models
    from perfusion_ray.models.reward_model import load_reward_model

    config = _config(args, "rm.out")
    model_dir = _local_copy(args.model or join(config.rm.out, "model"))
    load_reward_model(model_dir)  # a missing or broken model is one line, before anything is loaded
    baseline = args.baseline or join(_baseline_config(config).rm.out, "model")
    evaluation = evaluate_reward_models(config, model_dir, _local_copy(baseline) if exists(baseline) else None,
                                        build_environment(config).oracle)
    rows = []
    for scorer, subsets in evaluation.table.items():
        for subset in ("seen", "cold"):
            m = subsets[subset]
            rows.append((f"{scorer} ({subset})", f"{m['gauc']:.3f}", f"{m['map']:.3f}", f"{m['auc']:.3f}",
                         f"{m['logloss']:.3f}"))
    say(_table(rows, ("held-out groups", "GAUC", "MAP", "AUC", "logloss")))
    rm = evaluation.table["perfusion_rm"]
    say(f"\ngroups with P and N: seen {evaluation.groups['seen']}, cold start {evaluation.groups['cold']} "
          f"(cold start: merchants absent from the train split's groups)")
    if "oracle" in evaluation.table:
        oracle = evaluation.table["oracle"]
        say(f"PerFusionRM / oracle ceiling: seen {rm['seen']['gauc'] / oracle['seen']['gauc']:.1%}, "
              f"cold {rm['cold']['gauc'] / oracle['cold']['gauc']:.1%}")
    if "oracle_side_features" in evaluation.table:
        side = evaluation.table["oracle_side_features"]
        say(f"PerFusionRM / side-feature oracle (E[taste | observable features], perfect attributes): seen "
              f"{rm['seen']['gauc'] / side['seen']['gauc']:.1%}, cold {rm['cold']['gauc'] / side['cold']['gauc']:.1%}")
    metrics = evaluation.flat_metrics()
    out = args.metrics or join(config.rm.out, "metrics.json")
    write_json(out, metrics)
    say(f"metrics: {out}")
    return 0


# ---------------------------------------------------------------- alignment
def cmd_align_train(args: argparse.Namespace) -> int:
    from perfusion_ray.train.align_offline import train_alignment

    if not args.offline:
        raise PerfusionError("`perfusion align train` needs --offline (logged groups); the online rounds are "
                             "`perfusion align` with no action")
    config = _config(args, "align.out")
    with _logged(args, log_file(config.align.out, "align-train.log")):
        say(f"training the policy offline ({config.align.variant}, {config.align.max_steps} steps, Ray Train + "
            f"DeepSpeed ZeRO-{config.align.zero_stage})")
        report = train_alignment(config, resume=args.resume)
    resumed = f", resumed from step {report.resumed_from_step}" if report.resumed_from_step else ""
    say(f"aligned ({config.align.variant}, {config.align.adapter}): {report.steps} steps over "
          f"{report.groups_trained} groups in {report.seconds:.0f}s (optimizer loop {report.train_seconds:.0f}s"
          f"{resumed}), {report.denoiser_passes_per_group:.1f} denoiser passes per group, last loss "
          f"{report.final_loss:.3f}; pipeline: {report.pipeline_dir}")
    return 0


def _print_rounds(history: list[dict]) -> None:
    from perfusion_ray.report import TABLES, round_rows

    say(_table(round_rows(history), TABLES["rounds"]))


def cmd_align_online(args: argparse.Namespace) -> int:
    from perfusion_ray.coordinator import run_online

    config = _config(args, "online.out")
    with _logged(args, log_file(config.online.out, "align.log")):
        say(f"online rounds: {config.online.rounds} rounds of {config.online.requests_per_round} requests")
        report = run_online(config, resume=args.resume, rm_dir=args.rm)
    _print_rounds(report.history)
    resumed = f", resumed from round {report.resumed_from_round}" if report.resumed_from_round else ""
    say(f"\n{report.rounds} rounds in {report.seconds:.0f}s{resumed}; {len(report.consumed_partitions)} fresh "
          f"partitions consumed; RM {report.rm_version}; pipeline: {report.pipeline_dir}")
    if report.stopped:
        say(report.stopped)
    elif report.best_probe_round >= 0:
        say(f"shipped: the averaged policy of round {report.best_probe_round}, the best on the probe set")
    return 0


def alignment_rows(metrics: dict) -> list[tuple]:
    """One row per judge and split: utilities, win rate with its interval, personalization."""
    from perfusion_ray.evaluation.alignment import win_rate_text

    rows = []
    for by in ("oracle", "judge"):
        for split, suffix in (("all", ""), ("seen", ".seen"), ("cold", ".cold")):
            key = f"align.{by}"
            if f"{key}.win_rate{suffix}" not in metrics:
                continue
            rows.append((f"{by}: {split}", f"{metrics[f'{key}.utility.base{suffix}']:.3f}",
                         f"{metrics[f'{key}.utility.aligned{suffix}']:.3f}", win_rate_text(metrics, suffix, by),
                         f"{metrics[f'{key}.personalization.base{suffix}']:+.3f}",
                         f"{metrics[f'{key}.personalization{suffix}']:+.3f}"))
    return rows


ALIGNMENT_HEADER = ("judged by: held-out requests", "utility base", "utility aligned", "win rate (95% interval)",
                    "personalization base", "personalization aligned")


def cmd_align_eval(args: argparse.Namespace) -> int:
    from perfusion_ray.evaluation.alignment import evaluate_alignment

    config = _config(args, "align.out")
    pipeline_dir = args.pipeline or join(config.align.out, "pipeline")
    out = args.out or join(config.align.out, "eval")
    metrics = evaluate_alignment(config, pipeline_dir, out, judge_dir=args.judge).metrics
    say(_table(alignment_rows(metrics), ALIGNMENT_HEADER))
    if "align.agreement.rank_correlation" in metrics:
        say(f"\njudge vs oracle: rank correlation of per-request gains "
              f"{metrics['align.agreement.rank_correlation']:+.2f}; win rate difference (judge - oracle) "
              f"{metrics.get('align.agreement.win_rate_difference', float('nan')):+.1%}")
    fidelity = [f"{name.split('.')[-1]} {metrics[name + '.base']:.1%} base -> {metrics[name]:.1%} aligned"
                for name in sorted(metrics) if name.startswith("align.fidelity.") and name + ".base" in metrics]
    if fidelity:
        say("fidelity: " + "; ".join(fidelity))
    say(f"metrics: {join(out, 'metrics.json')}; base vs aligned grid: {join(out, 'grid.png')}")
    return 0


# ---------------------------------------------------------------- reward endpoint
def cmd_serve(args: argparse.Namespace) -> int:
    from perfusion_ray.serve.command import run

    return run(args, _config(args, "design.store_root"))


# ---------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: simulate -> ingest -> RM -> serve -> online rounds -> evaluate -> report."""
    from perfusion_ray.demo import run_demo

    with _logged(args, args.out / "logs" / "demo.log"):
        metrics = run_demo(_config(args, "data.root", "rm.out", "align.out", "online.out"), quick=args.quick, out=args.out, through_endpoints=args.through_endpoints)
    from perfusion_ray.evaluation.alignment import win_rate_text

    rows = [(split, f"{metrics[f'rm.gauc.{split}']:.3f}", f"{metrics[f'rm.gauc.oracle' + ('' if split == 'seen' else '.cold')]:.3f}",
             f"{metrics[f'align.oracle.utility.base.{split}']:.3f}", f"{metrics[f'align.oracle.utility.aligned.{split}']:.3f}",
             win_rate_text(metrics, f".{split}", "oracle"),
             win_rate_text(metrics, f".{split}", "judge") if f"align.judge.win_rate.{split}" in metrics else "-")
            for split in ("seen", "cold")]
    say()
    say(_table(rows, ("merchants", "RM GAUC", "oracle GAUC", "utility base", "utility aligned",
                        "win rate (oracle)", "win rate (judge)")))
    say(f"\nfidelity: class accuracy {metrics['align.fidelity.class_acc.base']:.1%} -> "
          f"{metrics['align.fidelity.class_acc']:.1%}; demo took {metrics['demo.seconds'] / 60:.1f} min")
    if args.through_endpoints:
        say(f"events through the endpoints: sent {metrics['endpoints.events.sent']:.0f}, stored "
              f"{metrics['endpoints.events.stored']:.0f}, ingested {metrics['endpoints.events.grouped']:.0f} + "
              f"quarantined {metrics['endpoints.events.quarantined']:.0f}")
    say(f"report: {args.out / 'report.html'} (and report.md); metrics: {args.out / 'metrics.json'}; "
          f"pipeline: {args.out / 'pipeline'}")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=None, help=f"YAML config (default {DEFAULT_CONFIG.name})")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set rm.lr=1e-4 (repeatable)")
    common.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' output in the "
                                                               "terminal instead of the run's log file")
    parser = argparse.ArgumentParser(prog="perfusion", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    config_commands = commands.add_parser("config", help="the configuration").add_subparsers(dest="action", required=True)
    p = config_commands.add_parser("docs", help="the configuration reference, from the fields' descriptions")
    p.add_argument("--out", type=Path, default=None, help="write it here (docs/configuration.md) instead of printing")
    p.set_defaults(handler=cmd_config_docs)

    world = commands.add_parser("world", help="FashionWorld").add_subparsers(dest="action", required=True)
    p = world.add_parser("simulate", parents=[common], help="simulate feedback partitions into the store")
    p.add_argument("--split", choices=["train", "holdout", "both"], default="both")
    p.set_defaults(handler=cmd_world_simulate)

    data = commands.add_parser("data", help="the feedback store").add_subparsers(dest="action", required=True)
    p = data.add_parser("ingest", parents=[common], help="validate + group new partitions (Ray Data)")
    p.add_argument("--split", choices=["train", "holdout", "both"], default="both")
    p.add_argument("--engine", choices=["ray", "local"], default="ray", help="local: one process, no cluster")
    p.set_defaults(handler=cmd_data_ingest)
    p = data.add_parser("inspect", parents=[common], help="counts, label distribution, quarantine reasons")
    p.add_argument("--split", choices=["train", "holdout", "both"], default="both")
    p.set_defaults(handler=cmd_data_inspect)

    p = data.add_parser("adapt", parents=[common], help="public preference data -> group examples")
    p.add_argument("kind", choices=["pickapic_v2", "pickapic_rankings"])
    p.add_argument("--input", required=True, help="a parquet file of that data set")
    p.add_argument("--out", required=True, help="folder for groups.parquet and quarantine.parquet")
    p.add_argument("--ties", choices=["keep", "drop"], default="keep", help="Pick-a-Pic 0.5/0.5 rows")
    p.set_defaults(handler=cmd_data_adapt)

    pretrain = commands.add_parser("pretrain", help="the embedded models").add_subparsers(dest="action", required=True)
    p = pretrain.add_parser("clip", help="the embedded CLIP for the reward model's towers")
    p.add_argument("--out", type=Path, default=None, help="default: assets/embedded_clip")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omit", type=float, default=0.3, help="chance a caption leaves an attribute out")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on 2 busy cores)")
    p.set_defaults(handler=cmd_pretrain)

    p = pretrain.add_parser("base", parents=[common], help="the embedded base diffusion model (hours on 2 cores)")
    from perfusion_ray.environment import pretrain_base_arguments  # imports no torch

    pretrain_base_arguments(p)
    p.set_defaults(handler=cmd_pretrain)

    rm = commands.add_parser("rm", help="the reward model").add_subparsers(dest="action", required=True)
    p = rm.add_parser("train", parents=[common], help="PerFusionRM on Ray Train + DeepSpeed")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of rm.out")
    p.add_argument("--with-baseline", action="store_true", help="also train the plug-in-off baseline")
    p.add_argument("--judge", action="store_true", help="also train the judge: an RM on the holdout split's "
                                                        "feedback alone, for evaluation without an oracle "
                                                        "(<rm.out>/judge/model)")
    p.add_argument("--judge-only", action="store_true", help="with --judge: train the judge and nothing else")
    p.set_defaults(handler=cmd_rm_train)
    p = rm.add_parser("eval", parents=[common], help="GAUC/MAP/AUC/logloss against baselines and the oracle")
    p.add_argument("--model", type=path_or_uri, help="exported RM directory (default <rm.out>/model)")
    p.add_argument("--baseline", type=path_or_uri, help="plug-in-off RM directory (default <rm.out>/no_plugin/model)")
    p.add_argument("--metrics", type=path_or_uri, help="where to write metrics.json (default <rm.out>/metrics.json)")
    p.set_defaults(handler=cmd_rm_eval)

    p = commands.add_parser("align", parents=[common], help="the personalized generator: online rounds (no action), "
                                                          "or train --offline / eval")
    p.add_argument("--resume", action="store_true", help="continue the rounds from the latest checkpoint of online.out")
    p.add_argument("--rm", help="RM directory served at the start (default serve.model_dir, else <rm.out>/model)")
    p.set_defaults(handler=cmd_align_online)
    align = p.add_subparsers(dest="action", required=False)
    p = align.add_parser("train", parents=[common], help="the group objective under Ray Train + DeepSpeed ZeRO")
    p.add_argument("--offline", action="store_true", help="on the logged group examples of the train split")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of align.out")
    p.set_defaults(handler=cmd_align_train)
    p = align.add_parser("eval", parents=[common], help="base vs aligned on held-out requests (oracle and judge)")
    p.add_argument("--pipeline", type=path_or_uri, help="exported PerFusionPipeline (default <align.out>/pipeline)")
    p.add_argument("--out", type=path_or_uri, help="folder for metrics.json and grid.png (default <align.out>/eval)")
    p.add_argument("--judge", type=path_or_uri, help="judge RM directory (default <rm.out>/judge/model when it exists)")
    p.set_defaults(handler=cmd_align_eval)

    p = commands.add_parser("serve", parents=[common], help="the reward model, or (--app design) the design "
                                                            "endpoint and merchant page, on Ray Serve (127.0.0.1)")
    p.add_argument("--app", choices=("reward", "design"), default="reward", help="which application (default reward)")
    p.add_argument("--model", help="RM directory or URI (default serve.model_dir, else <rm.out>/model); with "
                                              "--app design, the PerFusionPipeline directory (default "
                                              "design.pipeline_dir, else <align.out>/pipeline)")
    p.add_argument("--detach", action="store_true", help="deploy or roll out to RAY_ADDRESS's cluster and return")
    p.add_argument("--duration", type=float, default=0, help="seconds to serve before stopping (0: until Ctrl-C)")
    p.set_defaults(handler=cmd_serve)

    p = commands.add_parser("demo", parents=[common], help="the main job on the embedded default")
    p.add_argument("--quick", action="store_true", help="a smaller smoke version (a few minutes)")
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for the report, metrics.json and pipeline/")
    p.add_argument("--through-endpoints", action="store_true",
                   help="the simulated merchants make the fresh feedback through the design endpoint's HTTP API")
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PerfusionError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `perfusion` script: main(), then the process's exit output into the command's log file."""
    code = main()
    log_until_exit()
    sys.exit(code)


if __name__ == "__main__":
    run()
