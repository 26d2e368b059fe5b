"""Batched generation with a DecoderLM: AR sampling and PFLM k-tokens-per-pass decoding.

Both modes share one loop over a static KV cache. The prefill puts every prompt but its last
token into the cache; each decode step then feeds the tokens still pending (the last prompt
token first, later the tokens emitted by the previous step) and, for a PFLM, k fresh noise
slots. Feeding the last prompt token in the first step rather than in the prefill is
mathematically the same as the method's description (the cache then holds the whole prompt
and the first step's noise slots see it), and it makes every generated token come out of a
timed decode step in both modes: AR takes N steps for N tokens, a PFLM ceil(N / k).

Noise and samples come from one seeded ``torch.Generator`` on the decoding device, drawn in a
fixed order (one ``[batch, k]`` float64 uniform draw per PFLM step, one multinomial per AR
step), so a run is reproducible for a given batch, seed and device.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import DecodeError
from .format import DTYPES, load_decoder_tokenizer, load_decoder_weights, read_decoder_config
from .model import DecoderLM

MODES = ("ar", "pflm")


@dataclasses.dataclass
class GenerationResult:
    """tokens: the new tokens per prompt (cut after the first EOS, EOS included); finished:
    whether each sequence emitted EOS; steps: decode forward passes (prefill excluded);
    new_tokens: tokens kept over the batch; seconds: decode wall time (prefill excluded);
    prefill_seconds: the prefill's; texts: decoded continuations (generate_text only)."""
    tokens: list[list[int]]
    finished: list[bool]
    steps: int
    new_tokens: int
    seconds: float
    prefill_seconds: float
    mode: str = "ar"
    k: int = 1
    texts: Optional[list[str]] = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _same_device(want: torch.device, have: torch.device) -> bool:
    # "cuda" means the current CUDA device, whatever its index
    return want.type == have.type and (want.index is None or want.index == have.index)


def _check_request(model: DecoderLM, prompts, mode: str, k: int, max_new_tokens: int, tau: float,
                   frequency_penalty: float, eos_id) -> list[list[int]]:
    if not isinstance(model, DecoderLM):
        raise DecodeError(f"model must be a DecoderLM (load one with load_decoder), got "
                          f"{type(model).__name__}")
    if mode not in MODES:
        raise DecodeError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "pflm" and model.kind != "pflm":
        raise DecodeError("mode='pflm' needs a PFLM checkpoint (kind 'pflm', with a noise "
                          "encoder); this one is an AR model: use mode='ar'")
    if mode == "ar" and model.kind != "ar":
        raise DecodeError("mode='ar' needs an AR checkpoint; this one is a PFLM (kind 'pflm'), "
                          "which decodes with mode='pflm' (the noise slots replace sampling)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DecodeError(f"k must be a positive integer, got {k!r}")
    if mode == "ar" and k != 1:
        raise DecodeError(f"k={k} is the PFLM block size; AR decoding emits one token per step: "
                          f"leave k=1 or use mode='pflm'")
    if mode == "pflm" and k > model.max_k:
        raise DecodeError(f"k={k} exceeds the checkpoint's max_k={model.max_k} (the block size "
                          f"it was trained for); use k <= {model.max_k}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(tau, (int, float)) and tau > 0 and tau != float("inf")):
        raise DecodeError(f"tau must be a positive finite temperature, got {tau!r}")
    if not isinstance(frequency_penalty, (int, float)) or frequency_penalty != frequency_penalty \
            or abs(frequency_penalty) == float("inf"):
        raise DecodeError(f"frequency_penalty must be a finite number, got {frequency_penalty!r}")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < model.vocab_size):
        raise DecodeError(f"eos_id must be None or a token id in [0, {model.vocab_size}), "
                          f"got {eos_id!r}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise DecodeError("prompts must be a non-empty list of token-id lists (use "
                          "generate_text for strings)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise DecodeError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        if not p:
            raise DecodeError(f"prompt {i} is empty; every prompt needs at least one token "
                              f"(e.g. the EOS/BOS id the model was trained to start after)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise DecodeError(f"prompt {i} must hold integer token ids")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= model.vocab_size:
            raise DecodeError(f"prompt {i} holds token id {lo if lo < 0 else hi} outside "
                              f"[0, {model.vocab_size}); encode with the checkpoint's tokenizer")
        if len(p) + max_new_tokens > model.max_seq_len:
            raise DecodeError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens} > model.max_seq_len={model.max_seq_len}; shorten "
                f"the prompt or generate fewer tokens")
        out.append(list(p))
    return out


@torch.no_grad()
def generate(model: DecoderLM, prompts: Sequence[Sequence[int]], *, mode: str, k: int = 1,
             max_new_tokens: int, tau: float = 1.0, frequency_penalty: float = 0.0, seed: int = 0,
             eos_id: Optional[int] = None, ignore_eos: bool = False, device=None) -> GenerationResult:
    """Decode a batch of prompts (token-id lists of any lengths) on the model's device.

    mode 'ar': sample from softmax((logits - frequency_penalty * counts) / tau) with
    ``torch.multinomial``. mode 'pflm': per step, k noise slots u ~ U(0, 1) conditioned on tau;
    y_i = argmax(logits_i - frequency_penalty * counts), counts = the tokens this sequence
    emitted before the step. ``eos_id`` None takes the checkpoint's (``ignore_eos``: none, so
    every sequence runs max_new_tokens, as speed measurements need); a sequence stops after its
    EOS while the batch goes on until every sequence is done or has max_new_tokens tokens.
    ``device``: None or the model's device (move the model with ``.to``/load_decoder).
    """
    if eos_id is None and not ignore_eos:
        eos_id = model.eos_id if isinstance(model, DecoderLM) else None
    prompts = _check_request(model, prompts, mode, k, max_new_tokens, tau, frequency_penalty,
                             eos_id)
    dev = model.device
    if device is not None and not _same_device(torch.device(device), dev):
        raise DecodeError(f"the model is on {dev}, generate was asked for {device}; load it "
                          f"there (load_decoder(folder, device=...)) or call model.to(device)")
    b, N, V = len(prompts), max_new_tokens, model.vocab_size
    lens = [len(p) for p in prompts]
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    cache = model.allocate_cache(b, max(lens) + N)
    counts = torch.zeros(b, V, device=dev) if frequency_penalty else None
    out = torch.zeros(b, N, dtype=torch.long, device=dev)

    _sync(dev)
    t0 = time.perf_counter()
    if max(lens) > 1:
        head = max(lens) - 1
        ids = torch.tensor([p[:-1] + [0] * (head - len(p) + 1) for p in prompts], dtype=torch.long)
        model.forward_step(cache, ids.to(dev), num_new=[n - 1 for n in lens], output="none")
    pending = torch.tensor([[p[-1]] for p in prompts], dtype=torch.long, device=dev)
    _sync(dev)
    t1 = time.perf_counter()

    done = torch.zeros(b, dtype=torch.bool, device=dev)
    produced = steps = 0
    while produced < N:
        if mode == "ar":
            logits = model.forward_step(cache, pending, output="last", check_ids=False)[:, :V]
            if counts is not None:
                logits = logits - frequency_penalty * counts
            probs = torch.softmax(logits / tau, dim=-1)
            new = torch.multinomial(probs, 1, generator=gen)  # [b, 1]
        else:
            u = torch.rand((b, k), generator=gen, device=dev, dtype=torch.float64)
            # The last step may need fewer than k tokens: drop the trailing slots (slot i never
            # sees later slots, so the kept tokens are unchanged) to stay inside max_seq_len.
            m = min(k, N - produced)
            logits = model.forward_step(cache, pending, noise_u=u[:, :m], tau=tau,
                                        output="noise", check_ids=False)[..., :V]
            if counts is not None:
                logits = logits - frequency_penalty * counts[:, None]
            new = logits.argmax(-1)  # [b, m]
        steps += 1
        w = new.shape[1]
        out[:, produced:produced + w] = new
        produced += w
        if counts is not None:
            counts.scatter_add_(1, new, torch.ones(new.shape, device=dev))
        if eos_id is not None:
            done |= (new == eos_id).any(1)
            if produced < N and bool(done.all()):
                break
        pending = new
    _sync(dev)
    t2 = time.perf_counter()

    rows = out[:, :produced].cpu().tolist()
    tokens, finished = [], []
    for row in rows:
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
            finished.append(True)
        else:
            finished.append(False)
        tokens.append(row)
    return GenerationResult(tokens=tokens, finished=finished, steps=steps,
                            new_tokens=sum(len(t) for t in tokens), seconds=t2 - t1,
                            prefill_seconds=t1 - t0, mode=mode, k=k)


def generate_text(model: DecoderLM, tokenizer, texts: Sequence[str], **kwargs) -> GenerationResult:
    """``generate`` on encoded ``texts``; the result's ``texts`` are the decoded continuations
    (without the EOS token). ``eos_id`` defaults to the checkpoint's, then the tokenizer's."""
    if isinstance(texts, str):
        texts = [texts]
    if tokenizer is None:
        raise DecodeError("generate_text needs a tokenizer; this checkpoint has no tokenizer/ "
                          "folder: load one with kforcing_dist.data.tokenizer.load_tokenizer")
    prompts = tokenizer.encode_batch(list(texts))
    for i, p in enumerate(prompts):
        if not p:
            raise DecodeError(f"text {i} ({texts[i]!r}) encodes to no tokens; give every prompt "
                              f"some text")
    eos = kwargs.get("eos_id")
    if eos is None:
        eos = model.eos_id if model.eos_id is not None else tokenizer.eos_id
    kwargs["eos_id"] = eos
    result = generate(model, prompts, **kwargs)
    result.texts = [tokenizer.decode(t[:-1] if f and t and t[-1] == eos else t)
                    for t, f in zip(result.tokens, result.finished)]
    return result


def load_decoder(folder, device="cpu", dtype=None) -> DecoderLM:
    """A DecoderLM with the folder's weights on ``device``; ``dtype`` None keeps the stored one
    ("float32" / "bfloat16" or a torch dtype, float16 included, converts)."""
    cfg = read_decoder_config(folder)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DecodeError(f"dtype must be one of {sorted(DTYPES)} or a torch dtype, "
                              f"got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DecodeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    weights = load_decoder_weights(folder, cfg)
    stored = DTYPES[cfg["dtype"]]
    model = DecoderLM(cfg, dtype=stored)
    # assign=True adopts the loaded tensors instead of copying into the fresh (empty) ones
    model.load_state_dict(weights, strict=True, assign=True)
    model.requires_grad_(False)
    model.to(device=device, dtype=dtype or stored)
    return model.eval()


class Decoder:
    """A loaded checkpoint (model + its tokenizer, if saved) with generation shortcuts."""

    def __init__(self, folder, device="cpu", dtype=None):
        self.folder = Path(folder)
        self.model = load_decoder(folder, device=device, dtype=dtype)
        self.tokenizer = load_decoder_tokenizer(folder)

    @property
    def kind(self) -> str:
        return self.model.kind

    def generate(self, prompts, **kwargs) -> GenerationResult:
        kwargs.setdefault("mode", self.model.kind)
        return generate(self.model, prompts, **kwargs)

    def generate_text(self, texts, **kwargs) -> GenerationResult:
        kwargs.setdefault("mode", self.model.kind)
        return generate_text(self.model, self.tokenizer, texts, **kwargs)


def decode_kwargs(decode_cfg, mode: str) -> dict:
    """generate() keyword arguments from a DecodeConfig (k only applies to mode 'pflm')."""
    return {"mode": mode, "k": decode_cfg.k if mode == "pflm" else 1, "tau": decode_cfg.tau,
            "max_new_tokens": decode_cfg.max_new_tokens,
            "frequency_penalty": decode_cfg.frequency_penalty, "seed": decode_cfg.seed}
