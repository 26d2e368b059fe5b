"""Batched generation with a DecoderLM: AR sampling and PFLM k-tokens-per-pass decoding.

Both modes share one loop over a static KV cache. The prefill puts every prompt but its last
token into the cache; each decode step then feeds the tokens still pending (the last prompt
token first, later the tokens emitted by the previous step) and, for a PFLM, k fresh noise
slots. Feeding the last prompt token in the first step rather than in the prefill is
mathematically the same as the method's description (the cache then holds the whole prompt
and the first step's noise slots see it), and it makes every generated token come out of a
timed decode step in both modes: AR takes N steps for N tokens, a PFLM ceil(N / k).

Noise convention (shared by every mode that uses noise, and by training's G): one float64
table ``u [batch, max_new_tokens]`` is drawn up front from a seeded ``torch.Generator`` on the
decoding device (:func:`noise_table`); new token i of sequence b uses ``u[b, i]``, whichever
step produces it. So a PFLM block, the AR teacher sampling by inverse CDF (``sampling=
"inverse_cdf"``) and the lossless mode see the same u for the same token, and a run is
reproducible for a given batch, seed and device. AR with ``sampling="multinomial"`` (the
default: the plain serving baseline) draws one ``torch.multinomial`` per step instead.

Lossless mode (:func:`generate_lossless`): the PFLM drafts k tokens with u[i..i+k-1]; the AR
teacher runs [last token, draft] in one cached pass, computes its own G(x y_<j, u[i+j]) for the
k+1 positions, accepts the longest prefix where the draft agrees and appends its own token at
the first disagreement (or a bonus token when all k agree). The output is the teacher's own
inverse-CDF sample for that noise, token for token.

Frequency penalty (:mod:`.penalty`): counts of the tokens each sequence emitted, starting at zero
(prompt tokens are not counted). AR subtracts ``penalty * counts`` from each step's logits; a
PFLM block takes slot j's argmax after slots 1..j-1 of the same block were counted (the
authors' rule, :func:`.penalty.block_argmax`); lossless drafts the same way, the teacher's
verification ignores the penalty.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..nn.inverse_cdf import ORDERS, check_min_p, inverse_cdf_sample, truncate_min_p
from .errors import DecodeError
from .format import DTYPES, load_decoder_tokenizer, load_decoder_weights, read_decoder_config
from .model import DecoderLM
from .penalty import block_argmax, penalty_for_mode

MODES = ("ar", "pflm")
SAMPLINGS = ("multinomial", "inverse_cdf")
GRAPH_SESSIONS = 4  # (batch, capacity) shapes whose cache + CUDA graphs a model keeps


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
    # lossless mode: mean tokens kept per teacher pass (accepted draft tokens + the teacher's
    # own), over the sequences still running in each pass; 1.0 = nothing accepted, k+1 = all
    acceptance_length: Optional[float] = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _same_device(want: torch.device, have: torch.device) -> bool:
    # "cuda" means the current CUDA device, whatever its index
    return want.type == have.type and (want.index is None or want.index == have.index)


def noise_table(batch: int, max_new_tokens: int, seed: int, device) -> torch.Tensor:
    """The noise of one generate call: u [batch, max_new_tokens] float64 in [0, 1), token i of
    sequence b uses u[b, i] (see the module docstring)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand((batch, max_new_tokens), generator=gen, device=device, dtype=torch.float64)


class TauRangeWarning(UserWarning):
    """A PFLM decodes at a temperature outside the range it was trained on."""


def tau_range_message(model: DecoderLM, tau: float) -> Optional[str]:
    """Why decoding ``model`` (a PFLM) at ``tau`` is untested, or None: inside the ``tau_range``
    of its config.json, or no range recorded (an AR model, a folder exported before the key)."""
    tau_range = model.config.get("tau_range")
    if tau_range is None or tau_range[0] <= tau <= tau_range[1]:
        return None
    return (f"tau {tau:g} is outside the range [{tau_range[0]:g}, {tau_range[1]:g}] this student was "
            f"trained on; quality there is untested")


def _warn_tau_range(model: DecoderLM, tau: float) -> None:
    """Once per call, before decoding (never per step); Python shows a repeated one once."""
    message = tau_range_message(model, tau)
    if message:
        warnings.warn(message, TauRangeWarning, stacklevel=3)


def _resolve_order(model: DecoderLM, cdf_order: Optional[str]) -> str:
    order = cdf_order if cdf_order is not None else model.config.get("cdf_order") or "vocab"
    if order not in ORDERS:
        raise DecodeError(f"cdf_order must be one of {ORDERS}, got {order!r}")
    return order


def _resolve_min_p(model: DecoderLM, min_p: Optional[float]) -> float:
    """The teacher truncation to sample from: ``min_p``, else the one a PFLM was distilled against
    (its config's ``teacher_min_p``), else 0 (an AR model: the exact distribution)."""
    value = min_p if min_p is not None else model.config.get("teacher_min_p") or 0.0
    try:
        check_min_p(value)
    except (TypeError, ValueError):
        raise DecodeError(f"min_p must be a number in [0, 1) (0: no truncation), got {value!r}") from None
    return float(value)


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
    if isinstance(frequency_penalty, bool) or not isinstance(frequency_penalty, (int, float)) \
            or not math.isfinite(frequency_penalty) or frequency_penalty < 0:
        raise DecodeError(f"frequency_penalty must be a finite number >= 0 (resolve a per-k "
                          f"setting with decode.penalty.penalty_for_k), got {frequency_penalty!r}")
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


def _prefill(model: DecoderLM, cache, prompts: list[list[int]]) -> torch.Tensor:
    """Cache every prompt but its last token; returns the last tokens [b, 1] (pending)."""
    dev = model.device
    lens = [len(p) for p in prompts]
    if max(lens) > 1:
        head = max(lens) - 1
        ids = torch.tensor([p[:-1] + [0] * (head - len(p) + 1) for p in prompts], dtype=torch.long)
        model.forward_step(cache, ids.to(dev), num_new=[n - 1 for n in lens], output="none")
    return torch.tensor([[p[-1]] for p in prompts], dtype=torch.long, device=dev)


def _result(out: torch.Tensor, produced: int, eos_id, steps: int, t0: float, t1: float, t2: float,
            mode: str, k: int, lengths: Optional[list[int]] = None, **extra) -> GenerationResult:
    rows = out[:, :produced].cpu().tolist()
    if lengths is not None:
        rows = [r[:n] for r, n in zip(rows, lengths)]
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
                            prefill_seconds=t1 - t0, mode=mode, k=k, **extra)


@torch.no_grad()
def generate(model: DecoderLM, prompts: Sequence[Sequence[int]], *, mode: str, k: int = 1,
             max_new_tokens: int, tau: float = 1.0, frequency_penalty: float = 0.0, seed: int = 0,
             eos_id: Optional[int] = None, ignore_eos: bool = False, device=None,
             sampling: str = "multinomial", cdf_order: Optional[str] = None,
             cuda_graphs: bool = False, min_p: Optional[float] = None) -> GenerationResult:
    """Decode a batch of prompts (token-id lists of any lengths) on the model's device.

    mode 'ar': ``sampling="multinomial"`` samples from softmax((logits - frequency_penalty *
    counts) / tau) with ``torch.multinomial``; ``sampling="inverse_cdf"`` takes G(that, u[b, i])
    with the noise table and ``cdf_order`` (None: the checkpoint's, else "vocab"): the teacher's
    sample that a PFLM and the lossless mode reproduce. ``min_p`` (AR only; None: the model's
    ``teacher_min_p``, 0 for an AR model) samples the min-p truncated distribution, the teacher a
    student distilled with ``distill.teacher_min_p`` reproduces. mode 'pflm': per step, k noise slots
    (the next k entries of the noise table) conditioned on tau; y_j = argmax(logits_j -
    frequency_penalty * counts), counts = the tokens this sequence emitted before slot j, the
    block's slots 1..j-1 included (the authors' rule; prompt tokens are not counted).
    ``eos_id`` None takes the checkpoint's (``ignore_eos``: none, so every sequence runs
    max_new_tokens, as speed measurements need); a sequence stops after its EOS while the batch
    goes on until every sequence is done or has max_new_tokens tokens. ``device``: None or the
    model's device (move the model with ``.to``/load_decoder). ``cuda_graphs``: decode steps
    with static shapes, captured once per shape and replayed as CUDA graphs on a GPU (on a CPU
    the same static-shape steps run eagerly); same tokens as the default path.
    """
    if eos_id is None and not ignore_eos:
        eos_id = model.eos_id if isinstance(model, DecoderLM) else None
    prompts = _check_request(model, prompts, mode, k, max_new_tokens, tau, frequency_penalty,
                             eos_id)
    if mode == "pflm":
        _warn_tau_range(model, tau)
    if sampling not in SAMPLINGS:
        raise DecodeError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    dev = model.device
    if device is not None and not _same_device(torch.device(device), dev):
        raise DecodeError(f"the model is on {dev}, generate was asked for {device}; load it "
                          f"there (load_decoder(folder, device=...)) or call model.to(device)")
    order = _resolve_order(model, cdf_order)
    min_p = _resolve_min_p(model, min_p)
    b, N, V = len(prompts), max_new_tokens, model.vocab_size
    lens = [len(p) for p in prompts]
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    noisy = mode == "pflm" or sampling == "inverse_cdf"
    u = noise_table(b, N, seed, dev) if noisy else None
    cache, step = _session(model, b, max(lens) + N, tau, cuda_graphs)
    counts = torch.zeros(b, V, device=dev) if frequency_penalty else None
    out = torch.zeros(b, N, dtype=torch.long, device=dev)

    _sync(dev)
    t0 = time.perf_counter()
    pending = _prefill(model, cache, prompts)
    _sync(dev)
    t1 = time.perf_counter()

    done = torch.zeros(b, dtype=torch.bool, device=dev)
    produced = steps = 0
    if mode == "pflm" and not cuda_graphs:
        # The noise slots' inputs depend on (u, tau) only: one batched encoder pass over the
        # whole table (timed, part of decoding) instead of a small one per step. The graphed
        # step keeps encoding its own u (static shapes; on a GPU that pass is cheap).
        u = model.encode_noise(u, tau)
    while produced < N:
        if mode == "ar":
            logits = step(pending, None, None, "last")[:, :V]
            if counts is not None:
                logits = logits - frequency_penalty * counts
            if sampling == "inverse_cdf":
                new = inverse_cdf_sample(logits, u[:, produced], tau, order, min_p)[:, None]
            else:
                probs = torch.softmax(truncate_min_p(logits, tau, min_p) / tau, dim=-1)
                new = torch.multinomial(probs, 1, generator=gen)  # [b, 1]
        else:
            # The last step may need fewer than k tokens: drop the trailing slots (slot i never
            # sees later slots, so the kept tokens are unchanged) to stay inside max_seq_len.
            m = min(k, N - produced)
            logits = step(pending, None, u[:, produced:produced + m], "noise")[..., :V]
            new = block_argmax(logits, counts, frequency_penalty)  # [b, m]; counts them
        steps += 1
        w = new.shape[1]
        out[:, produced:produced + w] = new
        produced += w
        if counts is not None and mode == "ar":
            counts.scatter_add_(1, new, torch.ones(new.shape, device=dev))
        if eos_id is not None:
            done |= (new == eos_id).any(1)
            if produced < N and bool(done.all()):
                break
        pending = new
    _sync(dev)
    t2 = time.perf_counter()
    return _result(out, produced, eos_id, steps, t0, t1, t2, mode, k)


def _session(model: DecoderLM, batch: int, capacity: int, tau: float, cuda_graphs: bool):
    """(an empty cache, step(ids, num_new, noise_u, output) -> logits).

    Plain: a fresh cache and forward_step. With ``cuda_graphs`` the cache and its GraphStepper
    are kept on the model per (batch, capacity) and reset, so graphs are captured on the first
    call of a shape only (a warm-up run captures them before timed runs)."""
    if not cuda_graphs:
        cache = model.allocate_cache(batch, capacity)
        return cache, lambda ids, n, u, output: model.forward_step(
            cache, ids, num_new=n, noise_u=u, tau=tau, output=output, check_ids=False)
    from .graphs import GraphStepper

    sessions = model.__dict__.setdefault("_graph_sessions", {})
    key = (batch, capacity, model.device, model.dtype)
    if key not in sessions:
        if len(sessions) >= GRAPH_SESSIONS:  # bound the memory kept for caches and graphs
            sessions.pop(next(iter(sessions)))
        cache = model.allocate_cache(batch, capacity)
        sessions[key] = GraphStepper(model, cache)
    stepper = sessions[key]
    stepper.cache.reset()
    stepper.tau.fill_(float(tau))  # the graphs read this tensor
    return stepper.cache, lambda ids, n, u, output: stepper.step(ids, num_new=n, noise_u=u,
                                                                  output=output)


def _check_pair(student: DecoderLM, teacher: DecoderLM, k: int) -> None:
    if not isinstance(teacher, DecoderLM) or teacher.kind != "ar":
        raise DecodeError("lossless mode needs the AR teacher (a DecoderLM of kind 'ar') as "
                          "teacher=; load the teacher's export folder with load_decoder")
    if not isinstance(student, DecoderLM) or student.kind != "pflm":
        raise DecodeError("lossless mode drafts with a PFLM checkpoint (kind 'pflm'); this "
                          "model is an AR model")
    if student.vocab_size != teacher.vocab_size:
        raise DecodeError(f"student vocabulary ({student.vocab_size}) differs from the "
                          f"teacher's ({teacher.vocab_size}); they must share the tokenizer")
    if not _same_device(student.device, teacher.device):
        raise DecodeError(f"student on {student.device}, teacher on {teacher.device}; load both "
                          f"on one device")


@torch.no_grad()
def generate_lossless(student: DecoderLM, teacher: DecoderLM, prompts: Sequence[Sequence[int]], *,
                      k: int, max_new_tokens: int, tau: float = 1.0, seed: int = 0,
                      eos_id: Optional[int] = None, ignore_eos: bool = False,
                      cdf_order: Optional[str] = None, cuda_graphs: bool = False,
                      frequency_penalty: float = 0.0, min_p: Optional[float] = None) -> GenerationResult:
    """The teacher's inverse-CDF sample for the noise table of ``seed``, drafted k tokens at a
    time by ``student`` and verified by ``teacher`` in one parallel pass per block.

    Equals ``generate(teacher, prompts, mode="ar", sampling="inverse_cdf", ...)`` with the same
    seed, tau, cdf_order and min_p (None: the student's, the G it was distilled against), token for
    token (up to float round-off between a one-token and a (k+1)-token pass, which can only
    matter when u falls within ~1e-7 of a CDF boundary). ``steps`` counts teacher passes;
    ``acceptance_length`` the mean tokens kept per pass. ``frequency_penalty`` applies to the
    draft only (the student drafts as :func:`generate` decodes, counting the kept tokens and the
    block's earlier draft slots): it changes acceptance, never the output, which stays the
    teacher's sample. ``cuda_graphs`` as in :func:`generate` (both models).
    """
    if eos_id is None and not ignore_eos:
        eos_id = teacher.eos_id if isinstance(teacher, DecoderLM) else None
        if eos_id is None and isinstance(student, DecoderLM):
            eos_id = student.eos_id
    _check_pair(student, teacher, k)
    prompts = _check_request(student, prompts, "pflm", k, max_new_tokens, tau, frequency_penalty,
                             eos_id)
    _warn_tau_range(student, tau)
    order = _resolve_order(student, cdf_order)
    min_p = _resolve_min_p(student, min_p)
    dev = student.device
    b, N, V = len(prompts), max_new_tokens, student.vocab_size
    lens = [len(p) for p in prompts]
    for name, m in (("teacher", teacher), ("student", student)):
        # a verify pass reaches k positions past the last kept token
        if not m.rope and max(lens) + N + k > m.max_seq_len:
            raise DecodeError(f"lossless mode needs prompt + max_new_tokens + k = "
                              f"{max(lens) + N + k} positions, more than the {name}'s learned "
                              f"max_seq_len={m.max_seq_len}; generate fewer tokens")
    # Draft and verify positions past N read padding noise; their tokens are never kept.
    u = torch.cat([noise_table(b, N, seed, dev),
                   torch.full((b, k + 1), 0.5, dtype=torch.float64, device=dev)], dim=1)
    room = max(lens) + N + 2 * k + 2  # tokens + the widest chunk + noise slots as scratch
    s_cache, s_step = _session(student, b, room, tau, cuda_graphs)
    t_cache, t_step = _session(teacher, b, room, tau, cuda_graphs)
    out = torch.zeros(b, N + k + 1, dtype=torch.long, device=dev)
    ar_k = torch.arange(k + 1, device=dev)
    counts = torch.zeros(b, V, device=dev) if frequency_penalty else None  # kept tokens

    _sync(dev)
    t0 = time.perf_counter()
    s_pending = _prefill(student, s_cache, prompts)  # [b, c]: tokens the student has not cached
    t_pending = _prefill(teacher, t_cache, prompts)  # [b, 1]: the last token, not cached
    _sync(dev)
    t1 = time.perf_counter()

    s_new = torch.ones(b, dtype=torch.long)  # host: real tokens in each row of s_pending
    produced = torch.zeros(b, dtype=torch.long)  # host
    finished = torch.zeros(b, dtype=torch.bool)  # host: emitted EOS
    rounds = kept = active_rows = 0
    while True:
        active = (produced < N) & ~finished
        if not bool(active.any()):
            break
        start = produced.to(dev)
        idx = start[:, None] + ar_k  # [b, k+1] noise index of each verified position
        u_blk = u.gather(1, idx)
        c = max(int(s_new.max()), 1)
        draft = block_argmax(s_step(s_pending[:, :c], s_new, u_blk[:, :k], "noise")[..., :V],
                             None if counts is None else counts.clone(), frequency_penalty)
        logits = t_step(torch.cat([t_pending, draft], dim=1), None, None,
                        "all")[..., :V]  # [b, k+1, V]
        own = inverse_cdf_sample(logits, u_blk, tau, order, min_p)  # the teacher's G at every position
        agree = (own[:, :k] == draft).long().cumprod(1).sum(1)  # accepted draft tokens
        out.scatter_(1, idx, own)  # own[:agree+1] are kept; later entries are overwritten
        hit = torch.zeros(b, dtype=torch.bool, device=dev)
        if eos_id is not None:
            # stop at the first EOS among the kept tokens
            is_eos = (own == eos_id) & (ar_k[None, :] <= agree[:, None])
            first = torch.where(is_eos, ar_k[None, :], k + 1).min(1).values
            hit = first <= k
            agree = torch.minimum(agree, first)
        keep_host, hit_host = torch.stack([agree + 1, hit.long()]).cpu()  # the round's one sync
        keep = torch.minimum(keep_host, N - produced).clamp(min=0)
        keep = torch.where(active, keep, torch.zeros_like(keep))
        finished |= hit_host.bool() & active
        rounds += 1
        kept += int(keep.sum())
        active_rows += int(active.sum())
        # the teacher cached [pending, draft]: keep pending + the accepted keep-1 draft tokens
        t_cache.rewind(k + 1 - keep)
        keep_dev = keep.to(dev)
        if counts is not None:
            counts.scatter_add_(1, own, (ar_k[None, :] < keep_dev[:, None]).to(counts.dtype))
        last = own.gather(1, (keep_dev - 1).clamp(min=0)[:, None])
        t_pending = torch.where(keep_dev[:, None] > 0, last, t_pending)
        s_pending, s_new = own, keep
        produced += keep
    _sync(dev)
    t2 = time.perf_counter()
    res = _result(out, int(produced.max()), eos_id, rounds, t0, t1, t2, "lossless", k,
                  lengths=produced.tolist(),
                  acceptance_length=kept / active_rows if active_rows else None)
    return res


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


def decode_kwargs(decode_cfg, mode: str, k: Optional[int] = None, frequency_penalty=None) -> dict:
    """generate() keyword arguments from a DecodeConfig (k only applies to mode 'pflm', min_p to
    mode 'ar'; the frequency penalty resolved for that mode and k:
    :func:`.penalty.penalty_for_mode`). ``k`` and ``frequency_penalty`` (a number or a {k: value}
    map), when given, replace the config's, as command-line flags do."""
    if k is None:  # an explicit k stays, so generate() refuses k > 1 with mode 'ar'
        k = decode_cfg.k if mode == "pflm" else 1
    setting = decode_cfg.frequency_penalty if frequency_penalty is None else frequency_penalty
    extra = {"min_p": decode_cfg.min_p} if mode == "ar" else {}
    return {"mode": mode, "k": k, "tau": decode_cfg.tau, **extra,
            "max_new_tokens": decode_cfg.max_new_tokens,
            "frequency_penalty": penalty_for_mode(setting, mode, k),
            "seed": decode_cfg.seed}
