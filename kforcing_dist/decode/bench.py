"""Decode speed measurement: tokens per second of generate() on random prompts (median of repeats).

Used by the evaluation's speed table and for quick where-do-we-stand checks. EOS is disabled so
every run generates exactly ``new_tokens`` tokens per sequence; one untimed warm-up run precedes
the timed ones (first-call allocations, kernel selection).
"""

from __future__ import annotations

import statistics
from typing import Optional

import torch

from .generate import generate
from .model import DecoderLM


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen).tolist()


def speed_run(model: DecoderLM, *, mode: str, k: int = 1, batch: int = 1, prompt_len: int = 32,
              new_tokens: int = 64, repeats: int = 3, seed: int = 0,
              prompts: Optional[list[list[int]]] = None) -> dict:
    """Median decode tokens/s (prefill excluded) over ``repeats`` timed runs, with the details."""
    prompts = prompts or random_prompts(batch, prompt_len, model.vocab_size, seed)
    kw = dict(mode=mode, k=k, max_new_tokens=new_tokens, seed=seed, ignore_eos=True)  # time exactly new_tokens
    generate(model, prompts, **kw)
    runs = [generate(model, prompts, **kw) for _ in range(repeats)]
    tps = [r.tokens_per_second for r in runs]
    return {"mode": mode, "k": k, "batch": len(prompts), "prompt_len": len(prompts[0]),
            "new_tokens": new_tokens, "steps": runs[0].steps,
            "tokens_per_second": statistics.median(tps), "all_tokens_per_second": tps,
            "decode_seconds": statistics.median(r.seconds for r in runs),
            "prefill_seconds": statistics.median(r.prefill_seconds for r in runs)}
