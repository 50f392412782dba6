"""Command line: ``python -m benchmarks [SUITE ...] [--quick] [--out DIR] [--device cpu|cuda]``.

Runs the named suites (default: ``table1``; also ``attention``, the attention cost profiler, and
``kernels``, each kernel against PyTorch eager and torch.compile), writes each one's report (Markdown,
JSON, CSV, PNG) into the output folder, and prints the folder's path as the last line of output.

``python -m benchmarks report DIR [DIR ...]`` re-renders the reports (Markdown, CSV, PNG) of stored
runs from their ``results.json``, e.g. those under ``benchmarks/results/``; nothing is re-measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def run_table1(args: argparse.Namespace, out_dir: Path, argv: list[str]) -> list[Path]:
    """Suite ``table1``: Table 1 of Vaswani et al. (2017), measured (see benchmarks.table1)."""
    from . import report, table1
    from .environment import environment, load_average

    started, load_at_start = time.perf_counter(), load_average()
    overrides = {"batch": args.batch} if args.batch else {}
    cfg = table1.Config.quick(**overrides) if args.quick else table1.Config(**overrides)
    results = table1.run(cfg, device=args.device, progress=not args.no_progress)
    results.update(quick=args.quick, environment=environment(argv, load_at_start),
                   wall_time_s=time.perf_counter() - started)
    written = report.write(results, out_dir)
    _summarize(results)
    return written


def _summarize(results: dict) -> None:
    """A few lines on stdout: what was timed and the Table 1 growth rates that were measured."""
    t = results["timing"]
    measured = sum(r["status"] == "measured" for r in t["rows"])
    print(f"table1: {measured} of {len(t['rows'])} timings measured on {results['config']['device']} "
          f"in {results['wall_time_s']:.0f} s")
    if t["triton_not_timed_reason"]:
        print(f"table1: Triton kernels {t['triton_not_timed_reason']}")
    flops, seq, paths = results["flops"]["fits"], results["sequential_ops"]["fits"], results["max_path_length"]
    print(f"table1: FLOPs ~ n^{flops['attention_core']['exponent_n']:.2f} (attention core), "
          f"n^{flops['rnn']['exponent_n']:.2f} (RNN), n^{flops['conv']['exponent_n']:.2f} (conv)")
    per_position = {k: round(seq[k]["slope"], 2) + 0.0 for k in ("attention", "rnn_unrolled", "conv")}  # no -0.0
    print(f"table1: sequential ops per position: {per_position['attention']:.2f} (attention), "
          f"{per_position['rnn_unrolled']:.2f} (RNN), {per_position['conv']:.2f} (conv)")
    longest = max(r["n"] for r in paths["rows"])
    at = {r["layer"]: r["layers"] for r in paths["rows"] if r["n"] == longest}
    print(f"table1: max path length at n={longest}: {at['attention']} (attention), {at['rnn']} (RNN), "
          f"{at['conv']} (conv), {at['conv_dilated']} (dilated conv)")
    core = [c for c in results["crossover"]["by_flops"] if c["attention"] == "attention_core" and c["n_star"]]
    print("table1: FLOP crossover attention core vs RNN, n*/d: "
          + ", ".join(f"{c['n_star_over_d']:.3g} at d={c['d_model']}" for c in core))


def rerender(folders: list[str]) -> int:
    """``report DIR ...``: write each stored run's report again from its results.json."""
    import json

    from . import report, suite_report

    writers = {"table1": lambda r, d: report.write(r, d, write_json=False),
               "attention": suite_report.write_attention, "kernels": suite_report.write_kernels}
    for folder in map(Path, folders):
        stored = folder / "results.json"
        if not stored.is_file():
            print(f"report: {stored} does not exist", file=sys.stderr)
            return 2
        results = json.loads(stored.read_text())
        suite = results.get("suite", "table1")
        if suite not in writers:
            print(f"report: {stored} holds suite {suite!r}; known: {', '.join(writers)}", file=sys.stderr)
            return 2
        if suite == "table1" and "crossover" not in results:
            print(f"report: {stored} was written by an older table1 (no crossover, no forward+backward "
                  "timings); run the suite again to get a report of this version", file=sys.stderr)
            return 2
        writers[suite](results, folder)
        print(folder.resolve())
    return 0


def _run_kernel_suite(module_name: str, writer_name: str):
    """A runner for the ``attention`` / ``kernels`` suites: run, attach provenance, write the report."""

    def runner(args: argparse.Namespace, out_dir: Path, argv: list[str]) -> list[Path]:
        import importlib

        from . import suite_report
        from .environment import environment, load_average

        module = importlib.import_module(f"benchmarks.{module_name}")
        started, load_at_start = time.perf_counter(), load_average()
        overrides = {"trace_dir": str(out_dir)} if args.trace and module_name == "attention_cost" else {}
        if module_name == "kernels_suite":
            overrides.update({"sections": tuple(args.sections)} if args.sections else {},
                             tutorial_attention=args.tutorial_attention)
        cfg = module.Config.for_device(args.device, quick=args.quick, **overrides)
        results = module.run(cfg, device=args.device, progress=not args.no_progress)
        results.update(quick=args.quick, environment=environment(argv, load_at_start),
                       wall_time_s=time.perf_counter() - started)
        written = getattr(suite_report, writer_name)(results, out_dir)
        print(f"{module_name}: {results['wall_time_s']:.0f} s on {args.device}; report in {out_dir}")
        if results.get("interrupted"):
            print(f"{module_name}: {results['interrupted']}; the report holds what was measured", file=sys.stderr)
            args.interrupted = True
        return written

    runner.__doc__ = f"Suite ``{module_name}`` (see benchmarks.{module_name})."
    return runner


SUITES: dict[str, Callable[[argparse.Namespace, Path, list[str]], list[Path]]] = {
    "table1": run_table1,
    "attention": _run_kernel_suite("attention_cost", "write_attention"),
    "kernels": _run_kernel_suite("kernels_suite", "write_kernels"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmark suites and write a report (Markdown, JSON, PNG) into a folder "
                    "whose path is printed last.")
    parser.add_argument("suites", nargs="*", default=["table1"], metavar="SUITE",
                        help=f"suites to run (default: table1); available: {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="a reduced sweep (3 lengths, 1 round of few runs) that finishes in well under a minute")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench-out/<timestamp>/ under the current directory)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to time the layers (default: cuda if available, else cpu)")
    parser.add_argument("--batch", type=int, default=None, help="batch size of the timed forward passes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--trace", action="store_true",
                        help="attention suite: also export torch.profiler Chrome traces of each backend")
    parser.add_argument("--sections", type=lambda s: [x for x in s.split(",") if x], default=None,
                        metavar="A,B,...", help="kernels suite: the sections to run, in this order (default: "
                        "all of layer_norm,ffn,attention,attention_fp8,ffn_fp8,training_step)")
    parser.add_argument("--tutorial-attention", default=None, metavar="PATH",
                        help="kernels suite: a copy of Triton's python/tutorials/06-fused-attention.py (of the "
                             "installed release) whose FP8 forward is timed beside ours")
    args = parser.parse_args(argv)
    args.interrupted = False
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; available: {', '.join(SUITES)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.sections is not None:
        from .kernels_suite import SECTIONS

        if not args.sections or set(args.sections) - set(SECTIONS):
            parser.error(f"--sections {','.join(args.sections)}: each must be one of {','.join(SECTIONS)}")
    if args.tutorial_attention is not None and not Path(args.tutorial_attention).is_file():
        parser.error(f"--tutorial-attention {args.tutorial_attention}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        if len(argv) < 2:
            print("usage: python -m benchmarks report DIR [DIR ...]", file=sys.stderr)
            return 2
        return rerender(argv[1:])
    args = parse_args(argv)
    out = args.out or Path("bench-out") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for suite in dict.fromkeys(args.suites):
        SUITES[suite](args, out if len(args.suites) == 1 else out / suite, argv)
        if args.interrupted:  # a SIGINT ended this suite early: report it, run no further suite
            break
    print(out.resolve())
    return 130 if args.interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
