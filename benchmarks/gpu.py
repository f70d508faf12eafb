"""One CUDA GPU, in one short run: the GPU checks (`pytest -m cuda`), then the speed of the search, sampling and
training at 256 px with the paper's widths: the numbers a CPU cannot give.

    python benchmarks/gpu.py                          # one CUDA device; about 6 minutes on an H200
    python benchmarks/gpu.py --device cpu --quick     # a rehearsal of the whole script at toy sizes

Phases, each written to the report as soon as it ends (a run stopped part-way keeps what it measured), each
one's failure recorded and the next one run:
    tests      `pytest -m cuda tests/test_cuda.py`: search winners equal the CPU's in float32 (and in bfloat16 with
               float32 re-scoring on >= 95% of examples), sampling, training, --resume, torchrun with NCCL; with
               what each check measured
    peak       the device's dense bf16 rate on an 8192^3 matrix product: the ceiling actually reachable
    search     `hierarchical_search` at pools (200, 200, 20, 10): as chimle runs it on a GPU (bfloat16 renders with
               float32 re-scoring: search.precision=auto), in float32, and with cuDNN benchmarking (not chimle's
               deterministic setting): examples per second and the utilisation, multiply-adds counted
               (generator and LPIPS, every candidate and prefix render, not the re-scoring) x 2 / time / the
               peak (the datasheet's --peak-tflops, and the measured one)
    sample     images per second of 256 px outputs brought to the CPU: chimle.sample.Model.render as shipped
               (float32), and fixed weights under bfloat16 autocast, batched
    train      training steps per second at batch 1 (the paper's), float32 and bf16 autocast, fused Adam
    compile    the bfloat16 search through torch.compile (search.compile=true): compile time and speed (skipped
               when less than --compile-reserve seconds of --budget are left)
Model: the `paper` preset (210.6 M parameters, LPIPS-VGG), super-resolution 16 -> 256 px (levels render 32 ...
256 px), weights as initialised (speed does not depend on their values), inputs cropped from the built-in photos.
Every phase runs under chimle's precision policy (chimle.devices.configure: IEEE float32, deterministic cuDNN).
Writes OUT/gpu.json and OUT/gpu.md (OUT: benchmarks/results).

On a machine that cannot fetch the LPIPS weights (`chimle weights fetch`), copy lpips-alex.safetensors and
lpips-vgg.safetensors from a `$CHIMLE_HOME/weights` elsewhere into this one's (VGG's may be stored in float16 to
halve it: the speed does not depend on its values, and the checks use AlexNet, the built-in models' LPIPS).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import speed  # noqa: E402
import timing  # noqa: E402

from chimle.devices import configure  # noqa: E402
from chimle.sample import Model, variations  # noqa: E402
from chimle.search import fixed_weights, hierarchical_search  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUICK = ["model.blocks=1", *speed.NARROW]
PHASES = ("tests", "peak", "search", "sample", "train", "compile")


def lpips_macs(lpips: torch.nn.Module, side: int, device: torch.device) -> int:
    """Multiply-adds of the LPIPS features of one side x side image."""
    count = [0]

    def hook(module, args, output):
        count[0] += module.weight.numel() * output.shape[-2] * output.shape[-1]

    handles = [m.register_forward_hook(hook) for m in lpips.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        lpips.features(torch.zeros(1, 3, side, side, device=device))
    for h in handles:
        h.remove()
    return count[0]


def timed(fn, device: torch.device, warmup=None) -> float:
    """Seconds of one call of `fn`, after one call of `warmup` (default: `fn`)."""
    (warmup or fn)()
    timing.sync(device)
    started = time.perf_counter()
    fn()
    timing.sync(device)
    return time.perf_counter() - started


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# Phases ---------------------------------------------------------------------------------------------------------


def phase_tests(config, device, args, report) -> dict:
    """`pytest -m cuda` in a child process; per test its outcome and time, and what the checks measured."""
    with tempfile.TemporaryDirectory() as work:
        junit, measured = Path(work) / "junit.xml", Path(work) / "measured.json"
        env = {**os.environ, "CHIMLE_CUDA_REPORT": str(measured), "CHIMLE_TEST_DEVICE": device.type}
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", str(REPO / "tests" / "test_cuda.py")]
        started = time.perf_counter()
        try:
            result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.tests_timeout)
            returncode, output = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired as e:
            returncode, output = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        tests = []
        if junit.exists():
            for case in ElementTree.parse(junit).getroot().iter("testcase"):
                problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
                tests.append({"name": case.get("name"), "seconds": float(case.get("time", 0)),
                              "outcome": problem.tag if problem is not None else "passed",
                              "message": (problem.get("message") or "")[:600] if problem is not None else ""})
        return {"returncode": returncode, "seconds": time.perf_counter() - started, "tests": tests,
                "measured": json.loads(measured.read_text()) if measured.exists() else {},
                "output_tail": output[-3000:]}


def phase_peak(config, device, args, report) -> dict:
    """Dense bf16 TFLOP/s of a square matrix product (random data, mean of 10 after 3 warm-ups)."""
    n = 256 if args.quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    timing.sync(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    timing.sync(device)
    return {"n": n, "tflops": 2 * n**3 * 10 / (time.perf_counter() - started) / 1e12}


SEARCH_ROWS = {  # name -> (render dtype, cuDNN benchmarking)
    "bfloat16 + float32 re-scoring (chimle's default here)": (torch.bfloat16, False),
    "float32 (IEEE)": (None, False),
    "bfloat16 + re-scoring, cuDNN benchmarking": (torch.bfloat16, True),
}


def search_setup(config, device, args):
    generator, lpips, task = timing.build(config, device)
    inputs, targets = timing.examples(config, args.examples, device)
    macs = timing.level_macs(generator, inputs)
    sides = [y.shape[-1] for y in targets]
    generator_macs = speed.search_macs(macs, args.pools, speed.OURS) * 1e9
    feature_macs = sum((m + 1) * lpips_macs(lpips, side, device) for m, side in zip(args.pools, sides))  # + the target
    flops = 2 * (generator_macs + feature_macs) * args.examples

    def search(dtype, count=args.examples, compile=False):
        return hierarchical_search(generator, lpips, task, [x[:count] for x in inputs], [y[:count] for y in targets],
                                   torch.arange(count), args.pools, args.max_batch, dtype=dtype, compile=compile)

    summary = {"examples": args.examples, "pools": args.pools, "max_batch": args.max_batch, "sides": sides,
               "generator_gmac_per_example": generator_macs / 1e9, "lpips_gmac_per_example": feature_macs / 1e9}
    return search, flops, summary


def search_row(seconds: float, flops: float, args, measured_peak) -> dict:
    return {"seconds": seconds, "examples_per_second": args.examples / seconds, "tflops": flops / seconds / 1e12,
            "utilisation": flops / seconds / (args.peak_tflops * 1e12),
            "utilisation_of_measured_peak": flops / seconds / (measured_peak * 1e12) if measured_peak else None}


def phase_search(config, device, args, report) -> dict:
    search, flops, summary = search_setup(config, device, args)
    measured_peak = report.get("peak", {}).get("tflops")
    rows, winners = {}, {}
    for name, (dtype, benchmark) in SEARCH_ROWS.items():
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, not benchmark
        try:
            reset_peak(device)
            result = [None]

            def run():
                result[0] = search(dtype)

            seconds = timed(run, device, warmup=lambda: search(dtype, count=min(2, args.examples)))
            rows[name] = {**search_row(seconds, flops, args, measured_peak), **timing.gpu_memory(device)}
            winners[name] = result[0].winners
        finally:
            configure()
    reference = winners["float32 (IEEE)"]
    for name, w in winners.items():
        rows[name]["winners_equal_float32"] = (w == reference).float().mean(0).tolist()
    return {**summary, "runs": rows}


def phase_sample(config, device, args, report) -> dict:
    generator, _, task = timing.build(config, device)
    inputs, _ = timing.examples(config, 1, device)
    n, batch = args.images, args.sample_batch
    model = Model(copy.deepcopy(generator), config, device)
    image, sources = inputs[0][0].cpu(), variations([(0, 0)] * config.model.levels, set(), 0, n)
    rows = {}
    reset_peak(device)
    rows[f"chimle.sample.Model.render as shipped (float32), batch {batch}"] = n / timed(
        lambda: model.render(image, sources, batch=batch), device)
    render = speed.sampler(generator, task, inputs, n)
    with fixed_weights(generator, device, torch.bfloat16):
        rows[f"fixed weights, bfloat16 autocast, batch {batch}"] = n / timed(lambda: render(batch), device)
    return {"images": n, "batch": batch, "output_px": config.data.crop, "images_per_second": rows,
            **timing.gpu_memory(device)}


def phase_train(config, device, args, report) -> dict:
    rows = {}
    for name, precision in (("float32", "float32"), ("bfloat16 autocast", "bfloat16")):  # train.precision
        reset_peak(device)
        generator, lpips, task, optimizer, batch = speed.train_setup(config, device, "fused", False)
        result = speed.train_steps(speed.with_precision(config, precision), generator, lpips, task, optimizer, batch,
                                   device, warmup=2, steps=args.steps)
        rows[name] = {"seconds_per_step": result["seconds_per_step"], "steps_per_second": 1 / result["seconds_per_step"],
                      "breakdown": result["breakdown"], **timing.gpu_memory(device)}
        del generator, lpips, optimizer, batch
    return {"batch": 1, "steps": args.steps, "runs": rows}


def phase_compile(config, device, args, report) -> dict:
    search, flops, summary = search_setup(config, device, args)
    started = time.perf_counter()
    search(torch.bfloat16, count=1, compile=True)  # compiles every level: one graph per level serves a round
    timing.sync(device)
    compile_seconds = time.perf_counter() - started
    seconds = timed(lambda: search(torch.bfloat16, compile=True), device, warmup=lambda: None)
    eager = report.get("search", {}).get("runs", {}).get(next(iter(SEARCH_ROWS)), {}).get("seconds")
    return {**search_row(seconds, flops, args, report.get("peak", {}).get("tflops")),
            "compile_seconds": compile_seconds, "speedup_over_eager": eager / seconds if eager else None}


# Report ---------------------------------------------------------------------------------------------------------


def render(report: dict) -> str:
    out = [f"# GPU ({report['date']})\n",
           f"`{report['command']}` on {report['device_name']}; torch {report['torch']}; "
           f"{report['model']['parameters'] / 1e6:.1f} M parameters{' (quick: toy sizes)' if report['quick'] else ''}; "
           f"super-resolution to {report['crop']} px; {report.get('minutes', 0):.1f} min in all.\n"]
    failed = report.get("failed", {})
    for name, error in failed.items():
        out.append(f"**Phase `{name}` failed**: `{error.strip().splitlines()[-1] if error.strip() else error}`\n")
    if "tests" in report:
        t = report["tests"]
        counts = {k: sum(x["outcome"] == k for x in t["tests"]) for k in ("passed", "failure", "error", "skipped")}
        out += [f"## Checks (`pytest -m cuda tests/test_cuda.py`, {t['seconds']:.0f} s)\n",
                f"{counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, {counts['skipped']} "
                f"skipped (exit status {t['returncode']}).\n",
                timing.table(["check", "outcome", "s"], [[x["name"], x["outcome"] + (f": {x['message'][:160]}" if x["message"] else ""),
                                                         f"{x['seconds']:.1f}"] for x in t["tests"]])]
        if t["measured"]:
            out += ["What the checks measured:\n", "```json", json.dumps(t["measured"], indent=1), "```\n"]
    peak = report.get("peak", {}).get("tflops")
    if peak:
        out.append(f"Measured dense bf16 peak: {peak:.0f} TFLOP/s ({report['peak']['n']}^3 matrix product); "
                   f"the datasheet figure used below: {report['peak_tflops']:.0f}.\n")
    if "search" in report:
        s = report["search"]
        out += [f"## Code search (pools {s['pools']}, {s['examples']} examples, batches of {s['max_batch']} renders)\n",
                f"Counted per example: {s['generator_gmac_per_example']:.0f} GMAC in the generator, "
                f"{s['lpips_gmac_per_example']:.0f} GMAC in LPIPS.\n",
                timing.table(["search", "s", "examples/s", "TFLOP/s", f"of {report['peak_tflops']:.0f} TFLOP/s",
                              "of the measured peak", "peak GiB", "winners = float32's, per level"],
                             [[k, f"{v['seconds']:.2f}", f"{v['examples_per_second']:.2f}", f"{v['tflops']:.1f}",
                               f"{100 * v['utilisation']:.1f}%",
                               f"{100 * v['utilisation_of_measured_peak']:.1f}%" if v.get("utilisation_of_measured_peak") else "",
                               f"{v.get('peak_gpu_memory_gib', 0):.1f}",
                               " ".join(f"{a:.2f}" for a in v["winners_equal_float32"])] for k, v in s["runs"].items()])]
    if "compile" in report:
        c = report["compile"]
        speedup = f"{c['speedup_over_eager']:.2f}x the eager search" if c.get("speedup_over_eager") else ""
        out.append(f"Compiled (search.compile=true, bfloat16): {c['seconds']:.2f} s, {100 * c['utilisation']:.1f}% "
                   f"utilisation, {speedup}; compiling took {c['compile_seconds']:.0f} s.\n")
    if "sample" in report:
        p = report["sample"]
        out += [f"## Sampling ({p['images']} outputs of {p['output_px']} px)\n",
                timing.table(["how", "images/s"], [[k, f"{v:.1f}"] for k, v in p["images_per_second"].items()])]
    if "train" in report:
        t = report["train"]
        out += [f"## Training step (batch {t['batch']}, best of {t['steps']})\n",
                timing.table(["precision", "s/step", "steps/s", "peak GiB"],
                             [[k, f"{v['seconds_per_step']:.3f}", f"{v['steps_per_second']:.2f}",
                               f"{v.get('peak_gpu_memory_gib', 0):.1f}"] for k, v in t["runs"].items()])]
    goals = []
    if "search" in report:
        u = report["search"]["runs"][next(iter(SEARCH_ROWS))]["utilisation"]
        goals.append(["search utilisation (bf16) >= 40%", f"{100 * u:.1f}%", "yes" if u >= 0.4 else "**no**"])
    if "sample" in report:
        best = max(report["sample"]["images_per_second"].values())
        goals.append([f"sampling at {report['sample']['output_px']} px >= 100 images/s", f"{best:.1f}",
                      "yes" if best >= 100 else "**no**"])
    if "tests" in report:
        ok = report["tests"]["returncode"] == 0
        goals.append(["`pytest -m cuda` passes", "exit status " + str(report["tests"]["returncode"]), "yes" if ok else "**no**"])
    if goals:
        out += ["## Goals\n", timing.table(["goal", "measured", "met"], goals)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes (1 RRDB, 1/8 widths, 32 px, small pools)")
    parser.add_argument("--examples", type=int, default=None, help="examples searched (default 16; quick 2)")
    parser.add_argument("--max-batch", type=int, default=None, help="renders per batch in the search (default 400)")
    parser.add_argument("--images", type=int, default=None, help="images sampled (default 512; quick 4)")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 10; quick 2)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 peak (H200: 790)")
    parser.add_argument("--skip", default="", help=f"comma-separated phases to leave out: {', '.join(PHASES)}")
    parser.add_argument("--budget", type=float, default=480, help="seconds the whole run should take (default 480)")
    parser.add_argument("--compile-reserve", type=float, default=180,
                        help="seconds of the budget the compile phase needs left to start (default 180)")
    parser.add_argument("--tests-timeout", type=float, default=300, help="seconds for the checks (default 300)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this PyTorch sees no CUDA device (use --device cpu --quick to rehearse)")
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PHASES):
        raise SystemExit(f"--skip: unknown phase(s) {', '.join(sorted(skip - set(PHASES)))}; phases: {', '.join(PHASES)}")
    quick = args.quick
    args.examples = args.examples or (2 if quick else 16)
    args.max_batch = args.max_batch or (8 if quick else 400)
    args.images = args.images or (4 if quick else 512)
    args.steps = args.steps or (2 if quick else 10)
    args.pools = [4, 4, 2, 2] if quick else [200, 200, 20, 10]
    crop = 32 if quick else 256
    configure()
    config = speed.make_config("super-resolution", False, [f"data.crop={crop}", *(QUICK if quick else [])])

    started = time.perf_counter()
    report = {"date": datetime.date.today().isoformat(), "command": common.command_line(), "quick": quick,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "cuda": torch.version.cuda, "crop": crop, "peak_tflops": args.peak_tflops,
              "model": {"parameters": speed.count_parameters(speed.Generator(config.model))}, "failed": {},
              "skipped": sorted(skip)}
    functions = {"tests": phase_tests, "peak": phase_peak, "search": phase_search, "sample": phase_sample,
                 "train": phase_train, "compile": phase_compile}  # each (config, device, args, report so far)
    for name in PHASES:
        if name in skip:
            continue
        left = args.budget - (time.perf_counter() - started)
        if name == "compile" and left < args.compile_reserve:
            report["skipped"].append(f"compile ({left:.0f} s of the budget left)")
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        phase_started = time.perf_counter()
        try:
            report[name] = functions[name](config, device, args, report)
        except Exception:  # noqa: BLE001 - recorded in the report; the next phase still runs
            report["failed"][name] = traceback.format_exc()
            print(report["failed"][name], file=sys.stderr, flush=True)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: {time.perf_counter() - phase_started:.0f} s", file=sys.stderr, flush=True)
        report["minutes"] = (time.perf_counter() - started) / 60
        common.write("gpu", render(report), report, args.out)  # after every phase: a stopped run keeps its numbers
    markdown = render(report)
    print(markdown)
    md, js = common.write("gpu", markdown, report, args.out)
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
