"""The ``kforcing-dist`` command line: one entry, one thin function per subcommand.

Every subcommand takes ``-c/--config FILE``, repeatable ``--set key.path=value`` and
``-o/--output-dir DIR``; it loads and validates the config, then calls the app layer.
``main`` prints any :class:`~kforcing_dist.errors.UserError` as one line and exits 2 (the
traceback too with ``--debug`` or ``KFORCING_DIST_DEBUG=1``); other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError

# Every UserError (kforcing_dist/errors.py): one line naming the problem and the fix.
EXIT_USER_ERROR = 2
# A full traceback instead of the one line (the same as --debug).
DEBUG_ENV = "KFORCING_DIST_DEBUG"
# Saved and stopped before the end (signal or time budget): rerun the same command to resume.
# Not 0, so a Slurm ``afterok`` chain does not start the next stage on an unfinished one.
EXIT_STOPPED_EARLY = 3
# Commands that train, save and stop on SIGUSR1/SIGTERM (the others keep the default actions).
TRAINING_COMMANDS = ("train-teacher", "distill", "pipeline")


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("-c", "--config", required=config_required, help="YAML config file, e.g. configs/demo.yaml")
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

    p = sub.add_parser("verify-data", help="read every token shard of data.shards_dir: full sha256 and token ids "
                                           "in the vocabulary (prepare-data and training check a sample only)")
    _common(p)
    p.set_defaults(func=cmd_verify_data)

    p = sub.add_parser("train-teacher", help="pretrain the AR teacher under DeepSpeed (resumes automatically)")
    _common(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="train one K-Forcing stage (k1 from the teacher, k2/k4/k8 by self-forcing)")
    _common(p)
    p.add_argument("--stage", required=True, help="k1, k2, k4 or k8 (must be in distill.stages)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("pipeline", help="the whole chain: teacher -> k1 -> k2 -> k4 -> report")
    _common(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("generate", help="decode prompts with an exported model (JSONL out)")
    _common(p, config_required=False)
    p.add_argument("--model", required=True, help="decoder folder (a stage's export/), e.g. runs/demo/k4/export")
    p.add_argument("--prompts", default="-", help="text file, one prompt per line, or - for stdin")
    p.add_argument("--mode", choices=("auto", "ar", "pflm"), default="auto",
                   help="auto: pflm for a PFLM checkpoint, ar for a teacher")
    p.add_argument("--k", type=int, default=None, help="tokens per PFLM step (default decode.k, capped at max_k)")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help="one penalty for this decode, AR included (default decode.frequency_penalty: "
                        "the authors' per-k values for a PFLM, none for AR)")
    p.add_argument("--out", default="-", help="JSONL output file, or - for stdout")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="quality and speed report of a pipeline run folder")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="decode speed sweep: AR vs PFLM k vs lossless (bench.json, "
                                     "bench.md, plots into -o)")
    _common(p, config_required=False)
    p.add_argument("--teacher", default=None,
                   help="AR decoder folder (e.g. runs/demo/teacher/export); without it, random "
                        "weights of the config's model architecture (speed does not depend on "
                        "the weights)")
    p.add_argument("--student", default=None, help="PFLM decoder folder (e.g. runs/demo/k4/export)")
    p.add_argument("--batches", default=None, help="comma list (default eval.speed_batches)")
    p.add_argument("--ks", default=None, help="PFLM k values, comma list (default 1,2,4)")
    p.add_argument("--contexts", default=None, help="prompt lengths, comma list (default "
                                                    "eval.speed_context)")
    p.add_argument("--new-tokens", type=int, default=None, help="default eval.speed_new_tokens")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default "
                                                             "eval.speed_repeats)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--no-lossless", action="store_true", help="skip the lossless rows")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="replay decode steps as CUDA graphs (auto: on a GPU)")
    p.set_defaults(func=cmd_bench)

    _add_convert(sub)

    p = sub.add_parser("show-config", help="print the resolved config and check it for a world size")
    _common(p)
    p.add_argument("--world-size", type=int, default=1, help="number of processes to validate the layout for")
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("plan", help="check a layout and size a job per rank (memory, communication) before queueing it")
    _common(p)
    p.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    p.add_argument("--stage", default="k1", help="teacher, or a distillation stage k1, k2, k4, ... (default k1)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    _add_debug_flag(parser)
    return parser


def _add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="checkpoint tools: consolidate, reshard, from-hf, from-kforcing, to-hf")
    what = conv.add_subparsers(dest="what", metavar="WHAT", required=True)

    def out_opts(p, dtype=True):
        p.add_argument("--out", required=True, help="the folder to write (written to a temporary name, then renamed)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
        if dtype:
            p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                           help="weight dtype stored in the decoder folder")

    p = what.add_parser("consolidate", help="training checkpoint (any TP x PP x DP, ZeRO 0-3) -> decoder folder")
    p.add_argument("--checkpoint", required=True, help="a step-XXXXXXXX folder, or a run folder (newest complete)")
    out_opts(p)
    p.set_defaults(func=cmd_convert, run="run_consolidate")

    p = what.add_parser("reshard", help="training checkpoint -> training checkpoint at another TP/PP/DP; run it "
                                        "with the target's processes (torchrun/srun), e.g. --set parallel.tp=1")
    p.add_argument("--checkpoint", required=True, help="the source step-XXXXXXXX folder, or its run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="change the source's config.yaml, e.g. --set parallel.tp=1 (repeatable)")
    p.add_argument("-o", "--output-dir", required=True, help="the new run folder (gets checkpoints/step-N)")
    p.set_defaults(func=cmd_convert, run="run_reshard")

    p = what.add_parser("from-hf", help="local transformers GPT-2 / Llama / GPT-NeoX folder -> decoder folder")
    p.add_argument("--model", required=True, help="folder with config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=64,
                   help="vocabulary padding at TP=1 (model.make_vocab_size_divisible_by)")
    out_opts(p)
    p.set_defaults(func=cmd_convert, run="run_from_hf")

    p = what.add_parser("from-kforcing", help="the paper's released .ckpt (AR or PFLM) -> decoder folder")
    p.add_argument("--checkpoint", required=True, help="e.g. ar_openwebtxt.ckpt or pflm_owt_k4.ckpt")
    p.add_argument("--preset", choices=("owt", "lm1b"), default=None,
                   help="head count, length, mask token of the paper's OWT / LM1B models")
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--mask-token-id", type=int, default=None, help="its logit is forced to -1000")
    p.add_argument("--max-k", type=int, default=None, help="PFLM files: the k it was trained with (4)")
    p.add_argument("--tokenizer", default=None, help="a local Hugging Face tokenizer folder to store with it")
    out_opts(p)
    p.set_defaults(func=cmd_convert, run="run_from_kforcing")

    p = what.add_parser("to-hf", help="AR decoder folder -> transformers folder (Llama, GPT-2 or GPT-NeoX)")
    p.add_argument("--model", required=True, help="a decoder folder (e.g. runs/demo/teacher/export)")
    out_opts(p, dtype=False)
    p.set_defaults(func=cmd_convert, run="run_to_hf")


def cmd_convert(args) -> int:
    from .app import convert
    from .app.paths import output_folder

    if getattr(args, "out", None):  # written beside its final name, then renamed
        output_folder(Path(args.out).absolute().parent, "the folder of --out")
    return getattr(convert, args.run)(args)


def _load(args):
    from .config import load_config

    return load_config(args.config, args.overrides, args.output_dir)


def cmd_prepare_data(args) -> int:
    from .app.teacher import run_prepare_data

    cfg, _ = _load(args)
    run_prepare_data(cfg, args.config)
    return 0


def cmd_verify_data(args) -> int:
    from .app.runtime import setup_logging
    from .config import shards_dir_of
    from .data.shards import verify_shards

    cfg, _ = _load(args)
    setup_logging(0)
    shards = shards_dir_of(cfg)
    result = verify_shards(shards)
    unchecked = f" ({len(result['unchecked'])} without a recorded sha256)" if result["unchecked"] else ""
    print(f"{shards}: {result['files']} shard files, {result['bytes'] / 1e6:.1f} MB verified in "
          f"{result['seconds']:.2f} s{unchecked}")
    return 0


def cmd_train_teacher(args) -> int:
    from .app.teacher import run_train_teacher

    cfg, text = _load(args)
    result = run_train_teacher(cfg, text, args.config)
    return EXIT_STOPPED_EARLY if result.stopped_early else 0


def cmd_distill(args) -> int:
    from .app.distill import run_distill

    cfg, text = _load(args)
    result = run_distill(cfg, text, args.config, args.stage)
    return EXIT_STOPPED_EARLY if result.stopped_early else 0


def cmd_pipeline(args) -> int:
    from .app.distill import run_pipeline

    cfg, text = _load(args)
    return run_pipeline(cfg, text, args.config)


def cmd_generate(args) -> int:
    from .app.generate import run_generate

    cfg, _ = _load(args)
    return run_generate(cfg, args)


def cmd_evaluate(args) -> int:
    from .app.runtime import setup_logging
    from .eval.report import evaluate_run

    cfg, _ = _load(args)
    setup_logging(0)
    evaluate_run(cfg, Path(cfg.output_dir))
    return 0


def cmd_bench(args) -> int:
    from .app.bench import run_bench
    from .app.runtime import setup_logging

    cfg, _ = _load(args)
    setup_logging(0)
    return run_bench(cfg, args)


def cmd_show_config(args) -> int:
    from .config import check, config_to_yaml

    cfg, _ = _load(args)
    print(config_to_yaml(cfg), end="")
    check(cfg, args.world_size, source=args.config)
    print(f"# valid for world size {args.world_size}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    """Exit 0 when the job fits, 1 when it does not (2 for an invalid config or layout)."""
    import json

    from .parallel.plan import format_plan, make_plan

    cfg, _ = _load(args)
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.stage, args.gpu_memory_gb, source=args.config)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


def _add_debug_flag(parser: argparse.ArgumentParser, default=False) -> None:
    """``--debug`` on the parser and every subcommand, so it may come before or after the
    subcommand (below the top its default is SUPPRESS: a subcommand must not reset the top's)."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"on an error, print its traceback too (or set {DEBUG_ENV}=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child, default=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in TRAINING_COMMANDS:
        from .app import early_signals

        # before every heavy import (the commands import torch): a Slurm USR1 must not kill a
        # starting job
        early_signals.catch()
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            import traceback

            traceback.print_exc()
        what = f" {args.what}" if getattr(args, "what", None) else ""
        print(f"kforcing-dist {args.command}{what}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
