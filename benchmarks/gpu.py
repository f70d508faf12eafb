"""Search, sampling and training speed on one GPU at 256 px with the paper's widths: the numbers a CPU cannot give.

    python benchmarks/gpu.py                          # one CUDA device; about 5 minutes on an H200
    python benchmarks/gpu.py --device cpu --quick     # a rehearsal of the whole script at toy sizes

Model: the `paper` preset (210.6 M parameters, LPIPS-VGG), super-resolution 16 -> 256 px (levels render 32 ... 256
px), weights as initialised (speed does not depend on their values), inputs cropped from the built-in photos.
    search     `hierarchical_search` under bfloat16 autocast, pools (200, 200, 20, 10): examples per second, and
               the utilisation: multiply-adds counted (generator and LPIPS, every candidate and prefix render) x 2
               / time / the device's dense bf16 peak (--peak-tflops, default 790: an H200's)
    sample     images per second of 256 px outputs brought to the CPU, under `fixed_weights`, bf16 and float32, batched
    train      training steps per second at batch 1 (the paper's), float32 and bf16 autocast, fused Adam
Writes OUT/gpu.json and OUT/gpu.md (OUT: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import speed  # noqa: E402
import timing  # noqa: E402

from chimle.search import fixed_weights, hierarchical_search  # noqa: E402

QUICK = ["model.blocks=1", *speed.NARROW]


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


def timed(fn, device: torch.device, reps: int = 1) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    timing.sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    timing.sync(device)
    return (time.perf_counter() - started) / reps


def measure_search(config, device, args) -> dict:
    generator, lpips, task = timing.build(config, device)
    inputs, targets = timing.examples(config, args.examples, device)
    pools = args.pools
    seeds = torch.arange(args.examples)
    macs = timing.level_macs(generator, inputs)
    sides = [y.shape[-1] for y in targets]
    generator_macs = speed.search_macs(macs, pools, speed.OURS) * 1e9
    feature_macs = sum((m + 1) * lpips_macs(lpips, side, device) for m, side in zip(pools, sides))  # + the target
    flops = 2 * (generator_macs + feature_macs) * args.examples
    rows = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", None)):
        seconds = timed(lambda: hierarchical_search(generator, lpips, task, inputs, targets, seeds, pools,
                                                    args.max_batch, dtype=dtype), device)
        rows[name] = {"seconds": seconds, "examples_per_second": args.examples / seconds,
                      "tflops": flops / seconds / 1e12, "utilisation": flops / seconds / (args.peak_tflops * 1e12)}
    return {"examples": args.examples, "pools": pools, "max_batch": args.max_batch, "sides": sides,
            "generator_gmac_per_example": generator_macs / 1e9, "lpips_gmac_per_example": feature_macs / 1e9,
            "runs": rows, **timing.gpu_memory(device)}


def measure_sample(config, device, args) -> dict:
    generator, _, task = timing.build(config, device)
    inputs, _ = timing.examples(config, 1, device)
    n, batch = args.images, args.sample_batch
    render = speed.sampler(generator, task, inputs, n)
    rows = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", None)):
        with fixed_weights(generator, device, dtype):
            rows[name] = n / timed(lambda: render(batch), device)
    return {"images": n, "batch": batch, "output_px": config.data.crop, "images_per_second": rows}


def measure_train(config, device, args) -> dict:
    rows = {}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        generator, lpips, task, optimizer, batch = speed.train_setup(config, device, "fused", False)
        result = speed.train_steps(generator, lpips, task, optimizer, batch, device, warmup=2, steps=args.steps,
                                   dtype=dtype)
        rows[name] = {"seconds_per_step": result["seconds_per_step"], "steps_per_second": 1 / result["seconds_per_step"],
                      "breakdown": result["breakdown"]}
    return {"batch": 1, "steps": args.steps, "runs": rows}


def render(report: dict) -> str:
    s, p, t = report["search"], report["sample"], report["train"]
    out = [f"# GPU speed ({report['date']})\n",
           f"`{report['command']}` on {report['device_name']}; torch {report['torch']}; "
           f"{report['model']['parameters'] / 1e6:.1f} M parameters{' (quick: toy sizes)' if report['quick'] else ''}; "
           f"super-resolution to {report['crop']} px; {report['minutes']:.1f} min in all.\n",
           f"## Code search (pools {s['pools']}, {s['examples']} examples, batches of {s['max_batch']} renders)\n",
           f"Counted per example: {s['generator_gmac_per_example']:.0f} GMAC in the generator, "
           f"{s['lpips_gmac_per_example']:.0f} GMAC in LPIPS.\n",
           timing.table(["precision", "s", "examples/s", "TFLOP/s", f"utilisation of {report['peak_tflops']:.0f} TFLOP/s"],
                        [[k, f"{v['seconds']:.2f}", f"{v['examples_per_second']:.2f}", f"{v['tflops']:.1f}",
                          f"{100 * v['utilisation']:.1f}%"] for k, v in s["runs"].items()])]
    if "peak_gpu_memory_gib" in s:
        out.append(f"Peak GPU memory: {s['peak_gpu_memory_gib']:.1f} GiB.\n")
    out += [f"## Sampling ({p['images']} outputs of {p['output_px']} px, batches of {p['batch']})\n",
            timing.table(["precision", "images/s"], [[k, f"{v:.1f}"] for k, v in p["images_per_second"].items()]),
            f"## Training step (batch {t['batch']}, best of {t['steps']})\n",
            timing.table(["precision", "s/step", "steps/s"],
                         [[k, f"{v['seconds_per_step']:.3f}", f"{v['steps_per_second']:.2f}"] for k, v in t["runs"].items()]),
            "## Goals\n",
            timing.table(["goal", "measured", "met"], [
                ["search utilisation (bf16) >= 40%", f"{100 * s['runs']['bfloat16']['utilisation']:.1f}%",
                 "yes" if s["runs"]["bfloat16"]["utilisation"] >= 0.4 else "**no**"],
                [f"sampling at {p['output_px']} px >= 100 images/s", f"{max(p['images_per_second'].values()):.1f}",
                 "yes" if max(p["images_per_second"].values()) >= 100 else "**no**"]])]
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
    parser.add_argument("--skip", default="", help="comma-separated: search, sample, train")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this PyTorch sees no CUDA device (use --device cpu --quick to rehearse)")
    quick = args.quick
    args.examples = args.examples or (2 if quick else 16)
    args.max_batch = args.max_batch or (8 if quick else 400)
    args.images = args.images or (4 if quick else 512)
    args.steps = args.steps or (2 if quick else 10)
    args.pools = [4, 4, 2, 2] if quick else [200, 200, 20, 10]
    crop = 32 if quick else 256
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config = speed.make_config("super-resolution", False, [f"data.crop={crop}", *(QUICK if quick else [])])
    skip = set(args.skip.split(","))

    started = time.perf_counter()
    report = {"date": datetime.date.today().isoformat(), "command": common.command_line(), "quick": quick,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "crop": crop, "peak_tflops": args.peak_tflops,
              "model": {"parameters": speed.count_parameters(speed.Generator(config.model))}}
    for name, fn in (("search", measure_search), ("sample", measure_sample), ("train", measure_train)):
        if name not in skip:
            print(f"{name} ...", file=sys.stderr, flush=True)
            report[name] = fn(config, device, args)
    report["minutes"] = (time.perf_counter() - started) / 60
    if not skip & {"search", "sample", "train"}:
        markdown = render(report)
        print(markdown)
    else:
        markdown = "(partial run: " + ", ".join(sorted(skip)) + " skipped)\n"
    md, js = common.write("gpu", markdown, report, args.out)
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
