"""The ``generate`` command: prompts from a file or stdin -> JSONL continuations."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from ..config import Config
from ..decode import Decoder, DecodeError, TauRangeWarning, tau_range_message
from ..decode.generate import decode_kwargs
from .paths import check_output_file, open_output_file
from .runtime import setup_logging


def read_prompts(source: str) -> list[str]:
    text = sys.stdin.read() if source == "-" else _read_file(source)
    prompts = [line.rstrip("\n") for line in text.splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise DecodeError(f"no prompts in {'stdin' if source == '-' else source}: give one prompt per line")
    return prompts


def _read_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DecodeError(f"prompt file {p} does not exist (one prompt per line, or - for stdin)")
    return p.read_text()


def run_generate(cfg: Config, args) -> int:
    setup_logging(0)
    dec = cfg.decode
    if args.out != "-":
        check_output_file(args.out, "--out")  # before the model loads and the prompts are read
    decoder = Decoder(args.model)
    mode = decoder.kind if args.mode == "auto" else args.mode
    if mode != decoder.kind:
        name = {"ar": "an AR", "pflm": "a PFLM"}
        raise DecodeError(f"--mode {mode} needs {name[mode]} decoder folder, but {args.model} holds "
                          f"{name[decoder.kind]} model; use --mode {decoder.kind} (or auto)")
    k = args.k if args.k is not None else (min(dec.k, decoder.model.max_k) if mode == "pflm" else 1)
    kwargs = decode_kwargs(dec, mode, k=k, frequency_penalty=args.frequency_penalty)
    k, penalty = kwargs["k"], kwargs["frequency_penalty"]
    prompts = read_prompts(args.prompts)
    untested = tau_range_message(decoder.model, dec.tau) if mode == "pflm" else None
    if untested:  # once, as one line (the library's warning would add its source line)
        print(f"warning: {untested}", file=sys.stderr)
    out = sys.stdout if args.out == "-" else open_output_file(args.out, "--out")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TauRangeWarning)  # printed above
            for start in range(0, len(prompts), dec.batch_size):
                batch = prompts[start:start + dec.batch_size]
                res = decoder.generate_text(batch, **{**kwargs, "seed": kwargs["seed"] + start})
                for prompt, text, toks, fin in zip(batch, res.texts, res.tokens, res.finished):
                    out.write(json.dumps({"prompt": prompt, "completion": text, "tokens": toks, "finished": fin,
                                          "mode": mode, "k": k, "frequency_penalty": penalty}) + "\n")
                out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
