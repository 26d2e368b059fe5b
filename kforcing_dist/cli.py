"""The ``kforcing-dist`` command line: one entry, one thin function per subcommand.

Every subcommand takes ``-c/--config FILE``, repeatable ``--set key.path=value`` and
``-o/--output-dir DIR``; it loads and validates the config, then calls the app layer.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2
# Saved and stopped before the end (signal or time budget): rerun the same command to resume.
# Not 0, so a Slurm ``afterok`` chain does not start the next stage on an unfinished one.
EXIT_STOPPED_EARLY = 3


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="YAML config file, e.g. configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value (repeatable), e.g. --set train.lr=3e-4")
    p.add_argument("-o", "--output-dir", default=None, help="run folder (overrides output_dir in the config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kforcing-dist",
        description="Distil an autoregressive LM into a K-Forcing push-forward model, at cluster scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare-data", help="build the corpus and tokenizer, write memory-mapped token shards")
    _common(p)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train-teacher", help="pretrain the AR teacher under DeepSpeed (resumes automatically)")
    _common(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("show-config", help="print the resolved config and check it for a world size")
    _common(p)
    p.add_argument("--world-size", type=int, default=1, help="number of processes to validate the layout for")
    p.set_defaults(func=cmd_show_config)
    return parser


def _load(args):
    from .config import load_config

    return load_config(args.config, args.overrides, args.output_dir)


def cmd_prepare_data(args) -> int:
    from .app.teacher import run_prepare_data

    cfg, _ = _load(args)
    run_prepare_data(cfg, args.config)
    return 0


def cmd_train_teacher(args) -> int:
    from .app.teacher import run_train_teacher

    cfg, text = _load(args)
    result = run_train_teacher(cfg, text, args.config)
    return EXIT_STOPPED_EARLY if result.stopped_early else 0


def cmd_show_config(args) -> int:
    from .config import check, config_to_yaml

    cfg, _ = _load(args)
    print(config_to_yaml(cfg), end="")
    check(cfg, args.world_size, source=args.config)
    print(f"# valid for world size {args.world_size}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .training.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"kforcing-dist {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
