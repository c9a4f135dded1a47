"""fold's two paths on the zoo (``make zoo-fold-paths``): the end-to-end check against the full
path, on every model of the zoo sweep (``bench/results/zoo-timm.json``), unprepared.

``asrfx.fold`` of an ``nn.Module`` first tries to check trace and fold at once against the eager
model (the traced graph does not run by itself; shapes are recorded only if a pass reads one),
and takes the full path -- the trace checked on its own, then the fold -- when that check does
not pass. This script folds each model both ways (the attempt switched off for the second) and
records whether the attempt was taken, the time of each, and whether the two deploy models have
the same generated code and the same report sites; and the error of each against the eager
model on the sweep's second input (another batch and size).

Run in the zoo environment, one process, one torch thread (about 10 minutes)::

    ../.zoo-venv/bin/python bench/zoo_fold_paths.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo_sweep  # noqa: E402


def run_one(row: dict) -> dict:
    import torch
    import asrfx
    import asrfx.pipeline as pipeline

    attempt = pipeline._fold_checked_end_to_end
    rec = {"model": row["model"], "source": row["source"]}
    model = zoo_sweep._build(row["source"], row["model"]).eval()
    zoo_sweep.randomize_norms(model, 1)
    zoo_sweep.randomize_zero_weights(model, 2)
    x, other, _ = zoo_sweep.pick_inputs(model, row.get("input_size"))
    deploy = {}
    for path in ("end-to-end", "full"):
        taken: list = []
        pipeline._fold_checked_end_to_end = (
            (lambda *a, **k: taken.append(attempt(*a, **k)) or taken[-1]) if path == "end-to-end"
            else (lambda *a, **k: None))
        try:
            t0 = time.perf_counter()
            deploy[path] = asrfx.fold(model, example_inputs=(x,))
            rec[f"{path} s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a row, not the end of the sweep
            rec[f"{path} error"] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            pipeline._fold_checked_end_to_end = attempt
        if path == "end-to-end":
            rec["taken"] = bool(taken and taken[-1] is not None)
    if len(deploy) == 2:
        a, b = deploy["end-to-end"], deploy["full"]
        sites = [[(s.path, s.kind, s.action, s.code) for s in d.asrfx_report.sites] for d in (a, b)]
        rec["same sites"] = sites[0] == sites[1]
        rec["same code"] = a.code == b.code
        with torch.no_grad():
            ref = model(other)
            rec["error end-to-end"] = zoo_sweep.rel_err(ref, a(other))
            rec["error full"] = zoo_sweep.rel_err(ref, b(other))
    return rec


def summarise(rows: list[dict]) -> dict:
    both = [r for r in rows if "same sites" in r]
    taken = [r for r in both if r["taken"]]
    back = [r for r in both if not r["taken"]]
    ratio = [r["end-to-end s"] / r["full s"] for r in taken]
    return {
        "models": len(rows), "compared": len(both),
        "same code and sites": sum(r["same sites"] and r["same code"] for r in both),
        "errors differ": [r["model"] for r in rows if ("end-to-end error" in r) != ("full error" in r)],
        "end-to-end taken": len(taken),
        "median time ratio when taken": statistics.median(ratio) if ratio else None,
        "fell back": [r["model"] for r in back],
        "median time ratio when fell back": statistics.median(
            [r["end-to-end s"] / r["full s"] for r in back]) if back else None,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", nargs="*", help="model names")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = json.loads((out / zoo_sweep.RESULTS_JSON).read_text())["results"]
    if args.only:
        rows = [r for r in rows if r["model"] in args.only]
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row in rows:
            try:
                results.append(run_one(row))
            except Exception as e:  # noqa: BLE001
                results.append({"model": row["model"], "setup error": f"{type(e).__name__}: {e}"})
            print(json.dumps(results[-1]), flush=True)
    summary = summarise(results)
    (out / "zoo-fold-paths.json").write_text(json.dumps({"summary": summary, "results": results},
                                                        indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
