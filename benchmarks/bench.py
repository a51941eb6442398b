"""Is saelab as fast as hand-written PyTorch? Side by side, in one run, on the same data:

  saelab      the default multiclass experiment as users run it (`execute`, Lightning included,
              the live progress line on)
  plain       the same experiment as a plain PyTorch loop (benchmarks/plain_loop.py)
  per_sample  torchvision MNIST + ToTensor + Normalize + DataLoader (benchmarks/per_sample.py;
              timed on a fixed number of steps per stage and extrapolated, as it says)

Each variant runs in its own subprocess (its peak resident memory is its own); repetitions are
interleaved, and the fastest repetition of each variant is reported (other work on the machine only
ever adds time), with the median beside it. A scaling table follows: saelab's time against the
number of training samples and against the width of the network (fewer epochs, as it says).

    python benchmarks/bench.py [--quick] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from saelab.experiment.stages import plan

REPO = Path(__file__).resolve().parents[1]
MARK = "BENCH-RESULT "
TARGETS = {"saelab_over_plain_max": 1.15, "per_sample_over_saelab_min": 10.0,
           "peak_rss_gb_max": 1.5}
SAMPLES = (5000, 15000, None)  # None: the whole training set
WIDTHS = (0.5, 1.0, 2.0)


def child(variant: str, device: str, overrides: list[str], steps: int) -> dict:
    """Run one variant in this process; returns its timings and peak resident memory."""
    import torch

    from saelab.config.job import compose

    trainer = "trainer=gpu" if device == "cuda" else "trainer=cpu"
    cfg = compose([trainer, "progress=bar", "visualize.enabled=false", *overrides])
    if variant == "saelab":
        from saelab.api import execute

        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            metrics = execute(cfg, Path(out)).metrics
        total = time.perf_counter() - start
        stages = plan(cfg)
        result = {"stage_s": {s.name: metrics[s.name]["seconds"] for s in stages},
                  "total_s": total, "n_train": metrics["data"]["n_train"],
                  "test_acc": {s.name: metrics[s.name]["test_acc"] for s in stages
                               if s.classifies}}
    elif variant == "plain":
        from plain_loop import run_plain

        result = run_plain(cfg, torch.device(device))
    else:
        from per_sample import run_per_sample

        result = run_per_sample(cfg, steps)
    epochs = sum(cfg[stage.group].epochs for stage in plan(cfg))
    result.update(epochs=epochs, samples_per_s=result["n_train"] * epochs / result["total_s"],
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    return result


def spawn(variant: str, device: str, overrides: list[str], steps: int) -> dict:
    """One variant in a fresh Python process."""
    cmd = [sys.executable, __file__, "--child", variant, "--device", device,
           "--steps", str(steps), *[f"--set={o}" for o in overrides]]
    # Neither this process nor the reference loops' import Lightning (the stage registry does
    # not): Lightning switches on an NVML check that makes every Adam step ask whether CUDA is
    # there (~0.1 ms where torch has CUDA and the machine no GPU; saelab drops it while it trains).
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    # The result line may follow the progress line's last redraw ("\r...") on the same line.
    lines = [line[line.index(MARK):] for line in proc.stdout.splitlines() if MARK in line]
    if proc.returncode or not lines:
        sys.exit(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(MARK):]), "process_s": time.perf_counter() - start}


def epoch_overrides(epochs: int | None) -> list[str]:
    from saelab.config.job import compose

    groups = dict.fromkeys(stage.group for stage in plan(compose()))
    return [] if epochs is None else [f"{group}.epochs={epochs}" for group in groups]


def scaled_sizes(width: float) -> list[int]:
    return [784] + [max(2, round(d * width)) for d in (196, 49, 25, 9)]


def side_by_side(variants: list[str], device: str, reps: int, overrides: list[str],
                 steps: int) -> dict:
    """Interleaved repetitions of every variant; the fastest and median of each."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(reps):
        for variant in variants[rep % len(variants):] + variants[: rep % len(variants)]:
            result = spawn(variant, device, overrides, steps)
            runs[variant].append(result)
            print(f"  rep {rep + 1}/{reps} {variant:<10} {result['total_s']:8.1f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    out = {}
    for variant, results in runs.items():
        best = min(results, key=lambda r: r["total_s"])
        out[variant] = {**best, "median_total_s": statistics.median(r["total_s"] for r in results),
                        "all_total_s": [r["total_s"] for r in results],
                        "peak_rss_gb": max(r["peak_rss_gb"] for r in results)}
    return out


def ratios(results: dict) -> dict:
    out = {}
    if "plain" in results:
        out["saelab_over_plain"] = results["saelab"]["total_s"] / results["plain"]["total_s"]
        out["saelab_over_plain_median"] = (results["saelab"]["median_total_s"]
                                           / results["plain"]["median_total_s"])
        out["plain_over_saelab"] = 1 / out["saelab_over_plain"]
    if "per_sample" in results:
        out["per_sample_over_saelab"] = (results["per_sample"]["total_s"]
                                         / results["saelab"]["total_s"])
    out["saelab_peak_rss_gb"] = results["saelab"]["peak_rss_gb"]
    return out


def scaling(device: str, epochs: int, extra: list[str]) -> list[dict]:
    """saelab's time against training samples (full width) and width (all samples)."""
    points = [(n, 1.0) for n in SAMPLES] + [(None, w) for w in WIDTHS if w != 1.0]
    rows = []
    for n, width in points:
        sizes = scaled_sizes(width)
        overrides = [*epoch_overrides(epochs), *extra,
                     f"model.sizes=[{','.join(map(str, sizes))}]"]
        if n:
            overrides.append(f"data.train_limit={n}")
        result = spawn("saelab", device, overrides, 0)
        weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        rows.append({"n_train": result["n_train"], "width": width, "sizes": sizes,
                     "sum_din_dout": weights, "epochs_per_stage": epochs,
                     "total_s": result["total_s"],
                     "us_per_sample_epoch": 1e6 * result["total_s"] / (result["n_train"]
                                                                       * result["epochs"])})
        print(f"  scaling n={result['n_train']:>6} width x{width:<4} {result['total_s']:7.1f} s",
              flush=True)
    return rows


def line_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = a + b x, with the largest relative deviation of a point from it."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2
                                                                           for x in xs)
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys, strict=True))
    return {"intercept_s": a, "slope_s": b, "max_rel_deviation": worst}


def report(res: dict) -> str:
    results, names = res["variants"], list(next(iter(res["variants"].values()))["stage_s"])
    short = {n: n.replace("pretrain_layer", "layer") for n in names}
    head = f"{'variant':<12}" + "".join(f"{short[n]:>9}" for n in names)
    lines = [head + f"{'total':>9}{'median':>9}{'samples/s':>11}{'peak RSS':>10}"]
    for variant, r in results.items():
        mark = "*" if variant == "per_sample" else ""
        lines.append(f"{variant + mark:<12}" + "".join(f"{r['stage_s'][n]:>8.1f}s" for n in names)
                     + f"{r['total_s']:>8.1f}s{r['median_total_s']:>8.1f}s"
                     + f"{r['samples_per_s']:>11.0f}{r['peak_rss_gb']:>8.2f}GB")
    if "per_sample" in results:
        steps = results["per_sample"]["stages"]["baseline"]["measured_steps"]
        lines.append(f"* extrapolated from {steps} timed steps and one validation pass per stage "
                     "(see per_sample.py)")
    r = res["ratios"]
    if "saelab_over_plain" in r:
        lines.append(f"saelab / plain wall time: {r['saelab_over_plain']:.3f} (median "
                     f"{r['saelab_over_plain_median']:.3f}; plain / saelab "
                     f"{r['plain_over_saelab']:.2f}x)")
    if "per_sample_over_saelab" in r:
        lines.append(f"per_sample / saelab wall time: {r['per_sample_over_saelab']:.1f}x")
    lines.append(f"saelab peak RSS: {r['saelab_peak_rss_gb']:.2f} GB (10^9 bytes; ru_maxrss)")
    if res.get("scaling"):
        epochs = res["scaling"][0]["epochs_per_stage"]
        lines.append(f"scaling (saelab, {epochs} epoch(s) per stage):")
        lines.append(f"{'n_train':>8}{'sizes':>24}{'sum d_in*d_out':>16}{'time':>9}"
                     f"{'us/sample-epoch':>17}")
        for row in res["scaling"]:
            lines.append(f"{row['n_train']:>8}{str(row['sizes']):>24}{row['sum_din_dout']:>16}"
                         f"{row['total_s']:>8.1f}s{row['us_per_sample_epoch']:>17.1f}")
        for key, fit in res["scaling_fit"].items():
            lines.append(f"  time vs {key}: {fit['intercept_s']:.2f} s + {fit['slope_s']:.3g} s "
                         f"per unit, largest deviation {fit['max_rel_deviation']:.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 epoch per stage, 2 repetitions, 10 per-sample steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--variants", default=None,
                        help="comma-separated (default: saelab,plain,per_sample on the CPU, "
                             "saelab,plain on CUDA)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per stage of the per-sample path (default 60; quick 10)")
    parser.add_argument("--scaling-epochs", type=int, default=None,
                        help="epochs per stage of the scaling runs (default 2; quick 1; 0: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("SAELAB_MIRROR", str(REPO.parent / "shared" / "data"))
    if args.child:
        sys.path.insert(0, str(Path(__file__).parent))
        result = child(args.child, args.device, args.set, args.steps)
        print(MARK + json.dumps(result), flush=True)
        return

    default_variants = "saelab,plain,per_sample" if args.device == "cpu" else "saelab,plain"
    variants = (args.variants or default_variants).split(",")
    reps = args.reps or (2 if args.quick else 3)
    steps = args.steps or (10 if args.quick else 60)
    epochs = 1 if args.quick else None
    scaling_epochs = args.scaling_epochs if args.scaling_epochs is not None else (
        1 if args.quick else 2)
    import torch

    res = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "mode": "quick" if args.quick else "full", "device": args.device,
           "machine": device_name(args.device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "epochs_override": epochs, "overrides": args.set,
           "reps": reps, "per_sample_steps": steps, "targets": TARGETS,
           "load_avg_start": os.getloadavg()}
    print(f"benchmark on {res['machine']} ({res['threads']} threads), {reps} interleaved "
          f"repetitions, epochs {'as configured' if epochs is None else epochs}", flush=True)
    res["variants"] = side_by_side(variants, args.device, reps,
                                   [*epoch_overrides(epochs), *args.set], steps)
    res["ratios"] = ratios(res["variants"])
    if scaling_epochs:
        rows = res["scaling"] = scaling(args.device, scaling_epochs, args.set)
        by_n = [r for r in rows if r["width"] == 1.0]
        by_w = [r for r in rows if r["n_train"] == by_n[-1]["n_train"]]
        res["scaling_fit"] = {
            "n_train": line_fit([r["n_train"] for r in by_n], [r["total_s"] for r in by_n]),
            "sum_din_dout": line_fit([r["sum_din_dout"] for r in by_w],
                                     [r["total_s"] for r in by_w])}
    res["load_avg_end"] = os.getloadavg()
    out = args.out or REPO / "benchmarks" / "results" / (
        f"{args.device}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(report(res))
    print(f"load average {res['load_avg_start'][0]:.1f} at start, "
          f"{res['load_avg_end'][0]:.1f} at end; written {out}")


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores ({platform.machine()})"
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
