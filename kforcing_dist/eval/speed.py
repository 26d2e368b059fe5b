"""Decode speed of the AR teacher (multinomial sampling) and a PFLM at several k, same engine.

Every cell decodes the same prompts for the same number of new tokens with EOS ignored, after a
warm-up run (``decode.bench.speed_run``); the median (and min/max) over repeats is reported, with
the ratio to AR measured in the same run.
"""

from __future__ import annotations

import statistics


from ..decode.bench import speed_run


def _tokens_per_s(model, prompts, mode, k, new_tokens, repeats, seed) -> list[float]:
    run = speed_run(model, mode=mode, k=k, new_tokens=new_tokens, repeats=repeats, seed=seed, prompts=prompts)
    return run["all_tokens_per_second"]


def decode_speed(ar_model, pflm_model, prompt_pool: list[list[int]], batches: list[int], ks: list[int],
                 new_tokens: int, repeats: int, seed: int = 0) -> dict:
    """{"tokens_per_s": {batch: {"ar": x, "k1": y, ...}}, "speedup": {...}, "spread": {...}}."""
    out = {"tokens_per_s": {}, "speedup": {}, "min": {}, "max": {}, "new_tokens": new_tokens,
           "repeats": repeats, "prompt_len": len(prompt_pool[0])}
    for b in batches:
        prompts = [prompt_pool[i % len(prompt_pool)] for i in range(b)]
        cells = {"ar": _tokens_per_s(ar_model, prompts, "ar", 1, new_tokens, repeats, seed)}
        for k in ks:
            if k <= pflm_model.max_k:
                cells[f"k{k}"] = _tokens_per_s(pflm_model, prompts, "pflm", k, new_tokens, repeats, seed)
        key = str(b)
        out["tokens_per_s"][key] = {m: statistics.median(v) for m, v in cells.items()}
        out["min"][key] = {m: min(v) for m, v in cells.items()}
        out["max"][key] = {m: max(v) for m, v in cells.items()}
        ar = out["tokens_per_s"][key]["ar"]
        out["speedup"][key] = {m: v / ar for m, v in out["tokens_per_s"][key].items() if m != "ar"}
    return out
