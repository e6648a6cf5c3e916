"""The README's table of bench_models.py's runs, and issue-style targets checked per run.

    python bench/models_report.py [bench/results/models.json]

Per model, width and ppfast schedule, one cell per run: eta against the limit measured in that
run, the ratio to torch's schedule of the same name, and the measured bubble against the
simulated one at the run's profiled costs (in points). A block another process contended is
marked and left out of the target checks, which are:

- every zero-bubble schedule (ZB-H1, ZB-V, interleaved ZB) at eta >= 0.90;
- each at least 0.05 above ppfast's 1F1B in the same run;
- ZB-V at >= 1.2x torch's ZBVZeroBubble;
- the measured bubble within 2 points of the simulated one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ZB = ("zb-h1", "zb-v", "interleaved-zb")
NAMES = {"1f1b": "1F1B", "zb-h1": "ZB-H1", "zb-v": "ZB-V", "interleaved-zb": "interleaved ZB",
         "auto": "auto"}  # fmt: skip
MODELS = {"llama": "Llama", "qwen2": "Qwen2", "gpt2": "GPT-2"}


def _rows(result: dict) -> dict[tuple[str, str], dict]:
    return {(r["runtime"], r["schedule"]): r for r in result["rows"]}


def targets(result: dict) -> dict[str, list[str]]:
    """Target name -> the schedules that miss it in this block."""
    rows = _rows(result)
    base = rows[("ppfast", "1f1b")]["eta"]
    miss: dict[str, list[str]] = {"eta>=0.90": [], "+0.05 over 1F1B": [], "ZB-V 1.2x torch": [],
                                  "bubble within 2 points": []}  # fmt: skip
    for name in ZB:
        row = rows.get(("ppfast", name))
        if row is None:
            continue
        if row["eta"] < 0.90:
            miss["eta>=0.90"].append(f"{name} {row['eta']:.3f}")
        if row["eta"] - base < 0.05:
            miss["+0.05 over 1F1B"].append(f"{name} {row['eta'] - base:+.3f}")
        gap = row["bubble"] - row["simulated_bubble"]
        if abs(gap) > 0.02:
            miss["bubble within 2 points"].append(f"{name} {gap * 100:+.1f}")
    zbv = rows.get(("ppfast", "zb-v"))
    if zbv is not None and zbv.get("speedup_vs_torch", 0) < 1.2:
        miss["ZB-V 1.2x torch"].append(f"zb-v {zbv['speedup_vs_torch']:.2f}x")
    return miss


def report(data: dict) -> str:
    runs = data["runs"]
    blocks: dict[tuple[str, int], list[dict | None]] = {}
    for i, run in enumerate(runs):
        for res in run["results"]:
            blocks.setdefault((res["model"], res["width"]), [None] * len(runs))[i] = res
    head = " | ".join(f"run {i + 1}: η, ×torch, bubble − sim" for i in range(len(runs)))
    out = [f"| model | width | schedule | {head} |", "|---|---|---|" + "---|" * len(runs)]
    for (model, width), results in blocks.items():
        names = [r["schedule"] for r in next(x for x in results if x)["rows"]
                 if r["runtime"] == "ppfast"]  # fmt: skip
        for name in names:
            cells = []
            for res in results:
                row = _rows(res).get(("ppfast", name)) if res else None
                if row is None:
                    cells.append("–")
                    continue
                vs = row.get("speedup_vs_torch")
                gap = (row["bubble"] - row["simulated_bubble"]) * 100
                mark = " (contended)" if res["load"]["contended"] else ""
                label = row.get("auto_chose")
                cells.append(
                    f"{row['eta']:.3f}, {f'{vs:.2f}×' if vs else '–'}, {gap:+.1f}"
                    + (f" ({label})" if label else "")
                    + mark
                )
            out.append(f"| {MODELS.get(model, model)} | {width} | {NAMES.get(name, name)} | "
                       + " | ".join(cells) + " |")  # fmt: skip
    out.append("")
    for i, run in enumerate(runs):
        out.append(f"Run {i + 1} ({run['date']}, `{run['command'].strip()}`):")
        for res in run["results"]:
            where = f"{MODELS.get(res['model'], res['model'])} {res['width']}"
            if res["load"]["contended"]:
                out.append(f"- {where}: contended, not counted")
                continue
            missed = {k: v for k, v in targets(res).items() if v}
            text = "; ".join(f"{k}: {', '.join(v)}" for k, v in missed.items()) or "all met"
            out.append(f"- {where}: {text}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path(__file__).parent / "results" / "models.json"
    print(report(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
