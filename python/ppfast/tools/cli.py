"""The ``ppfast`` command: the demo, benchmarks, and schedule tools (simulate, validate, export)."""

from __future__ import annotations

import argparse
import json
import sys

from ..program.ir import Program
from ..program.simulator import Costs, simulate
from ..program.validate import ProgramError, validate


def _add_schedule_args(ap: argparse.ArgumentParser, required: bool) -> None:
    ap.add_argument("--schedule", "-s", required=required, help="schedule name (see `ppfast list`)")
    ap.add_argument("-p", type=int, help="pipeline ranks")
    ap.add_argument("-m", type=int, help="microbatches per step")
    ap.add_argument("-v", type=int, default=None, help="stages per rank (chunked schedules)")
    ap.add_argument(
        "--costs",
        type=Costs.parse,
        default=Costs(),
        help="per-pass costs F,I,W[,COMM] (default 1,1,1,0)",
    )
    ap.add_argument(
        "--mem-cap",
        type=float,
        default=None,
        help="activation memory cap per rank, in microbatches (used by `auto`, checked otherwise)",
    )


def build_program(args: argparse.Namespace) -> Program:
    """The program the arguments ask for: imported from torch's CSV or generated."""
    from ..program.schedules import generate, lookup

    if getattr(args, "import_torch_csv", None):
        from ..program.torch_format import read_csv

        return read_csv(args.import_torch_csv, naming=args.naming)
    if args.schedule is None or args.p is None or args.m is None:
        raise ValueError("give --schedule NAME, -p RANKS and -m MICROBATCHES (or a torch CSV)")
    spec = lookup(args.schedule)
    given = {"costs": args.costs, "mem_cap": args.mem_cap}
    # only schedules searched from costs (auto) take them; the fixed ones are simulated with them
    options = {k: val for k, val in given.items() if k in spec.options and val is not None}
    return generate(spec.name, args.p, args.m, args.v, **options)


def cmd_simulate(args: argparse.Namespace) -> int:
    program = build_program(args)
    try:
        lowered = validate(program)
        valid, error = True, None
    except ProgramError as e:
        lowered, valid, error = None, False, str(e)
    out: dict = {"schedule": program.name or "imported", "valid": valid}
    if error:
        out["error"] = error
    sim = None
    if valid:
        sim = simulate(program, args.costs)
        out.update(sim.summary())
        out["schedule"] = program.name or "imported"
        out["valid"] = True
        if "chosen" in program.meta:
            out["chosen"] = program.meta["chosen"]
        out["num_actions"] = program.num_actions()
        out["num_actions_lowered"] = lowered.num_actions()
        if args.mem_cap is not None:
            out["mem_cap"] = args.mem_cap
            out["within_mem_cap"] = max(sim.peak_activations) <= args.mem_cap + 1e-9
    if sim is not None and (args.png or args.trace):
        from ..program.draw import draw_png, spans_from, stage_chunks, write_trace

        spans = spans_from(sim.timeline())
        title = (
            f"{out['schedule']}  p={program.p} m={program.num_microbatches}"
            + (f" v={program.v}" if program.v > 1 else "")
            + f"  step {sim.makespan:g}  bubble {sim.bubble:.1%}"
        )
        if args.png:
            draw_png(
                spans,
                args.png,
                num_ranks=program.p,
                stage_chunk=stage_chunks(program.stage_to_rank),
                title=title,
                unit="passes",
            )
        if args.trace:
            write_trace(spans, args.trace, title=title, meta=sim.summary())
    if args.json:
        print(json.dumps(out))
    elif not valid:
        print(f"invalid program: {error}", file=sys.stderr)
    else:
        print(
            f"{out['schedule']}: p={out['p']} v={out['v']} m={out['m']}  step time "
            f"{out['makespan']:g}  bubble {out['bubble']:.2%}"
        )
        for r, (b, mem) in enumerate(
            zip(out["bubble_per_rank"], out["peak_activations"], strict=True)
        ):
            print(f"  rank {r}: bubble {b:6.2%}  peak activations {mem:g}")
        if args.png:
            print(f"wrote {args.png}")
        if args.trace:
            print(f"wrote {args.trace}")
    return 0 if valid else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from ..program.torch_format import read_csv

    try:
        program = read_csv(args.file, naming=args.naming)
        lowered = validate(program)
    except (ProgramError, ValueError) as e:
        print(f"{args.file}: invalid: {e}", file=sys.stderr)
        return 1
    kind = "with communication" if program.is_lowered else "compute-only"
    print(
        f"{args.file}: valid ({kind}, {program.meta.get('naming', 'current')} naming): "
        f"p={program.p} stages={program.num_stages} m={program.num_microbatches}; "
        f"dry run of {lowered.num_actions()} actions finishes"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..program.lowering import lower
    from ..program.torch_format import write_csv

    program = build_program(args)
    validate(program)
    if args.with_comms:
        program = lower(program, args.costs)
    write_csv(program, args.output, naming=args.naming_out)
    print(f"wrote {args.output}: {program.name} p={program.p} m={program.num_microbatches}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..program.schedules import SCHEDULES

    for name, spec in SCHEDULES.items():
        print(f"{name:18s} {spec.summary} (placement {spec.placement}, m >= {spec.min_m_text})")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ppfast", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="generate (or import) a schedule and simulate it")
    _add_schedule_args(sim, required=False)
    sim.add_argument("--import-torch-csv", metavar="FILE", help="simulate torch's CSV instead")
    sim.add_argument("--naming", default="auto", choices=["auto", "current", "legacy"])
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument("--png", metavar="FILE", help="draw the timeline")
    sim.add_argument("--trace", metavar="FILE", help="write a Chrome trace (opens in Perfetto)")
    sim.set_defaults(func=cmd_simulate)

    val = sub.add_parser("validate", help="check a program in torch's CSV form")
    val.add_argument("file")
    val.add_argument("--naming", default="auto", choices=["auto", "current", "legacy"])
    val.set_defaults(func=cmd_validate)

    exp = sub.add_parser("export", help="write a schedule as torch's CSV")
    _add_schedule_args(exp, required=True)
    exp.add_argument("-o", "--output", required=True)
    exp.add_argument("--with-comms", action="store_true", help="lower first (SEND/RECV)")
    exp.add_argument(
        "--naming", dest="naming_out", default="current", choices=["current", "legacy"]
    )
    exp.set_defaults(func=cmd_export)

    lst = sub.add_parser("list", help="the schedules ppfast generates")
    lst.set_defaults(func=cmd_list)

    demo = sub.add_parser(
        "demo",
        help="train a small GPT-style model pipelined on local ranks (`ppfast demo -h`)",
        add_help=False,
    )
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)

    from .benchmarks import BENCHMARKS

    bench = sub.add_parser(
        "bench",
        help="benchmarks: " + ", ".join(BENCHMARKS) + " (`ppfast bench NAME -h`)",
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return ap


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"ppfast.tools.benchmarks.{args.name}")
    return module.main(args.rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        # the demo parses its own flags: argparse's REMAINDER would drop the leading ones
        from .demo import main as demo_main

        return demo_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"ppfast {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
