"""The push-forward student (PFLM): the teacher's Transformer plus a noise encoder.

``PFLM`` is a :class:`TransformerLM` whose inputs may include *noise slots*: vectors made by
:class:`~kforcing_dist.nn.noise.NoiseEncoder` from (u, tau) instead of token embeddings.
``forward_windows`` runs a context and all its windows in one pass with the staircase layout
of :mod:`kforcing_dist.nn.window`; each window holds optional real tokens (the second pass
of progressive self-forcing) followed by noise slots, and only the noise slots go through the
LM head. The backbone is unchanged, so the teacher's weights load as they are
(``init_from_teacher``); the next stage starts from the previous one (``from_student``).
The noise encoder is replicated on every TP rank (plain torch, drawn from the default RNG
after the Transformer, so equal seeds give equal weights on every rank and at every TP size).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..config.schema import ModelConfig
from ..nn.noise import DEFAULT_NOISE_MAX_FREQ, NoiseEncoder, check_noise_features
from ..nn.window import check_window_starts, window_layout
from .loss import resolve_tp_group
from .state import full_state_dict, load_full_state_dict
from .transformer import TransformerLM

NOISE_PREFIX = "noise_encoder."

# ModelConfig fields that do not change the function a set of weights computes.
_NON_ARCH_FIELDS = ("attention_backend", "init_std")


def per_sequence_tau(tau, batch: int, device) -> torch.Tensor:
    """tau as a float64 tensor [b] (a number or a [b] tensor); ValueError unless positive."""
    t = torch.as_tensor(tau, dtype=torch.float64, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"tau must be a number or a tensor [b] = [{batch}], got shape {tuple(t.shape)}")
    if not bool(torch.all(t > 0)):
        raise ValueError("tau (temperature) must be positive")
    return t


def _check_same_architecture(a: ModelConfig, b: ModelConfig, what: str) -> None:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    diff = sorted(k for k in da if k not in _NON_ARCH_FIELDS and da[k] != db[k])
    if diff:
        raise ValueError(f"{what} has a different architecture: "
                         + ", ".join(f"{k}: {db[k]!r} vs {da[k]!r} here" for k in diff))


class PFLM(TransformerLM):
    """Push-forward LM: k noise slots per window, one forward pass; logits are vocab-parallel.

    ``max_k``: the most noise slots a window may have (the stage's k). ``noise_features``: the
    noise-feature convention (``rising`` or ``released``, see :mod:`kforcing_dist.nn.noise`);
    ``noise_max_freq``: highest frequency of ``rising`` features. ``noise_init_std``: std of the
    noise encoder's linears (default ``cfg.init_std``). ``masked_token_ids``: see TransformerLM.
    """

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp_group, max_k: int,
                 noise_max_freq: Optional[float] = DEFAULT_NOISE_MAX_FREQ, noise_init_std: Optional[float] = None,
                 params_dtype: torch.dtype = torch.float32, noise_features: str = "rising",
                 masked_token_ids: Sequence[int] = ()):
        if not isinstance(max_k, int) or max_k <= 0:
            raise ValueError(f"max_k (slots per window) must be a positive integer, got {max_k!r}")
        check_noise_features(noise_features, noise_max_freq)
        super().__init__(cfg, padded_vocab_size, tp_group, params_dtype, masked_token_ids)
        self.max_k = max_k
        self.noise_features = noise_features
        self.noise_max_freq = float(noise_max_freq) if noise_features == "rising" else None
        self.noise_init_std = cfg.init_std if noise_init_std is None else float(noise_init_std)
        # Built after the Transformer: the same seed gives the teacher's initial weights above.
        self.noise_encoder = NoiseEncoder(cfg.hidden_size, max_freq=self.noise_max_freq,
                                          init_std=self.noise_init_std, dtype=params_dtype,
                                          features=noise_features)

    def forward(self, input_ids: torch.Tensor, window_starts: Optional[torch.Tensor] = None,
                u: Optional[torch.Tensor] = None, tau=1.0, window_tokens: Optional[torch.Tensor] = None,
                context_gradients: bool = True):
        """With ``window_starts``: :meth:`forward_windows` (how a training engine calls the student);
        without: the plain causal LM forward of the backbone."""
        if window_starts is None:
            return super().forward(input_ids)
        return self.forward_windows(input_ids, window_starts, u, tau, window_tokens, context_gradients)

    # ---------------------------------------------------------------- windows

    def forward_windows(self, input_ids: torch.Tensor, window_starts: torch.Tensor,
                        u: torch.Tensor, tau, window_tokens: Optional[torch.Tensor] = None,
                        context_gradients: bool = True) -> torch.Tensor:
        """Logits of every noise slot of every window, in one pass.

        input_ids [b, N] context; window_starts [b, W] in [0, N-1]; u [b, W, m_noise] in [0, 1)
        (any float dtype; features are computed in float64); tau: number or [b];
        window_tokens [b, W, m_real] real tokens placed first in each window (positions
        t+1..t+m_real), then the noise slots at t+m_real+1..t+m_real+m_noise.
        Returns vocab-parallel float32 logits [b, W, m_noise, V_padded/tp].

        ``context_gradients`` False (``distill.context_gradients``): the same logits, but the
        context's hidden states carry no gradient: the context runs once without autograd
        (:meth:`context_pass`) and only the window items run with it, their keys and values over
        the context projected from those detached hidden states (so the key/value projections
        still learn from the context rows). The backward then covers the window rows instead of
        the context and window rows: a cheaper step that drops the gradient paths from the slots'
        loss through the context's residual stream.
        """
        if not context_gradients and torch.is_grad_enabled():
            with torch.no_grad():
                context = self.context_pass(input_ids)
            return self.window_item_logits(context, input_ids, window_starts, u, tau, window_tokens)
        hidden, position_ids, mask, shape = self.window_inputs(input_ids, window_starts, u, tau,
                                                               window_tokens)
        # context rows see only the context: they take the causal fast path; only the window
        # rows are read, so the last layer runs its queries and MLP on those alone
        N, m_real, m_noise = shape
        return self.window_logits(self.backbone(hidden, position_ids, mask, causal_prefix=N, read_from=N),
                                  (0, m_real, m_noise))

    def window_inputs(self, input_ids: torch.Tensor, window_starts: torch.Tensor, u: torch.Tensor,
                      tau, window_tokens: Optional[torch.Tensor] = None):
        """The embedding half of :meth:`forward_windows` (the pipeline's first stage runs it alone).

        Returns (hidden [b, L, H], position_ids [b, L], mask [b, 1, L, L], shape) where shape is
        (N, m_real, m_noise), what :meth:`window_logits` needs to pick the noise slots.
        """
        N, m_real, m_noise = self._check_windows(input_ids, window_starts, u, window_tokens)
        position_ids, mask = window_layout(N, window_starts.to(input_ids.device), m_real + m_noise)
        context = self.embed(input_ids, position_ids[:, :N])
        items = self._window_items(position_ids[:, N:], u, tau, window_tokens, context.dtype)
        return torch.cat([context, items], dim=1), position_ids, mask, (N, m_real, m_noise)

    def _check_windows(self, input_ids: torch.Tensor, window_starts: torch.Tensor, u: torch.Tensor,
                       window_tokens: Optional[torch.Tensor]) -> tuple[int, int, int]:
        """ValueError unless the window arguments fit together; returns (N, m_real, m_noise)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [b, N], got {tuple(input_ids.shape)}")
        b, N = input_ids.shape
        check_window_starts(window_starts, b, N)
        W = window_starts.shape[1]
        if not isinstance(u, torch.Tensor) or not u.dtype.is_floating_point:
            raise ValueError("u must be a floating-point tensor [b, W, m_noise]")
        if u.dim() != 3 or u.shape[:2] != (b, W) or u.shape[2] == 0:
            raise ValueError(f"u must have shape [b, W, m_noise] = [{b}, {W}, m >= 1], "
                             f"got {tuple(u.shape)}")
        m_noise = u.shape[2]
        if m_noise > self.max_k:
            raise ValueError(f"{m_noise} noise slots per window, but this PFLM has max_k={self.max_k}")
        m_real = 0
        if window_tokens is not None:
            if window_tokens.dim() != 3 or window_tokens.shape[:2] != (b, W):
                raise ValueError(f"window_tokens must have shape [b, W, m_real] = [{b}, {W}, m], "
                                 f"got {tuple(window_tokens.shape)}")
            m_real = window_tokens.shape[2]
        if self.embed_positions is not None:
            last = int(window_starts.max()) + m_real + m_noise
            if max(N - 1, last) >= self.cfg.max_seq_len:
                raise ValueError(f"window positions reach {max(N - 1, last)}, beyond "
                                 f"model.max_seq_len={self.cfg.max_seq_len} (learned positions)")
        return N, m_real, m_noise

    def _window_items(self, item_positions: torch.Tensor, u: torch.Tensor, tau,
                      window_tokens: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The input vectors of every window item, window-major [b, W*m, H]: each window's real
        tokens, then its noise slots; ``item_positions`` [b, W*m] from :func:`window_layout`."""
        b, W, m_noise = u.shape
        m_real = 0 if window_tokens is None else window_tokens.shape[2]
        m = m_real + m_noise
        tau = per_sequence_tau(tau, b, item_positions.device)
        item_pos = item_positions.view(b, W, m)
        parts = []
        if m_real:
            real = self.embed(window_tokens.reshape(b, W * m_real),
                              item_pos[:, :, :m_real].reshape(b, W * m_real))
            parts.append(real.view(b, W, m_real, -1))
        slots = self.noise_encoder(u, tau[:, None, None]).to(dtype)
        if self.embed_positions is not None:
            # Like ``embed``: learned absolute positions are added to every input vector.
            slots = slots + self.embed_positions(item_pos[:, :, m_real:])
        parts.append(slots)
        return torch.cat(parts, dim=2).reshape(b, W * m, -1)

    # ------------------------------------------------- window passes sharing one context pass

    def context_pass(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's input over the context [b, N, H], from one causal pass.

        In the staircase layout a context row never sees a window item, so the context rows of
        :meth:`forward_windows` are this causal pass whatever the windows; the window items
        then run alone (:meth:`window_item_logits`), projecting their keys and values over the
        context from these inputs (``distill.context_gradients: false``). Frozen passes take
        :meth:`context_keys_values` instead.
        """
        hidden, rotary = self._context_start(input_ids)
        inputs = [hidden]
        for layer in self.layers[:-1]:  # the last layer's output over the context is never read
            hidden = layer(hidden, rotary)
            inputs.append(hidden)
        return inputs

    def context_keys_values(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's attention keys and values over the context ([b, kv_heads/tp, N, d] each),
        from one causal pass: for passes without autograd (a frozen model's), whose window items
        then reuse them in every pass (:meth:`window_item_logits`) instead of projecting the
        context's layer inputs again. The last layer computes its keys and values only."""
        hidden, rotary = self._context_start(input_ids)
        keys_values = []
        for layer in self.layers[:-1]:
            hidden, kv = layer(hidden, rotary, return_kv=True)
            keys_values.append(kv)
        keys_values.append(self.layers[-1].keys_values(hidden, rotary))
        return keys_values

    def _context_start(self, input_ids: torch.Tensor):
        """(embedded context [b, N, H], its rotary tables) for the context passes above."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [b, N], got {tuple(input_ids.shape)}")
        b, N = input_ids.shape
        return self.embed(input_ids), self.rotary_tables(self.default_position_ids(b, N, input_ids.device))

    def window_item_logits(self, context: list, input_ids: torch.Tensor,
                           window_starts: torch.Tensor, u: torch.Tensor, tau,
                           window_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward_windows` with the context computed already: only the window items run.
        Same arguments and result as :meth:`forward_windows`; the same maths (equal up to float
        rounding).

        ``context``: ``context_pass(input_ids)`` (each layer's input over the context: the items'
        keys and values over the context are projected from it here, so under autograd the
        key/value projections learn from the context rows) or ``context_keys_values(input_ids)``
        (each layer's keys and values: nothing over the context is recomputed, for frozen passes).
        """
        N, m_real, m_noise = self._check_windows(input_ids, window_starts, u, window_tokens)
        b = input_ids.shape[0]
        given_kv = bool(context) and isinstance(context[0], tuple)
        if len(context) != len(self.layers) or (
                context[0][0].shape[0] != b or context[0][0].shape[2] != N if given_kv
                else context[0].shape[:2] != input_ids.shape):
            raise ValueError("context must be context_pass(input_ids) or context_keys_values(input_ids) "
                             "of this model")
        position_ids, mask = window_layout(N, window_starts.to(input_ids.device), m_real + m_noise)
        dtype = context[0][0].dtype if given_kv else context[0].dtype
        x = self._window_items(position_ids[:, N:], u, tau, window_tokens, dtype)
        rotary = self.rotary_tables(position_ids[:, N:])
        item_rows = mask[:, :, N:]  # the items' rows: context <= t and their own window
        if given_kv:
            for layer, kv in zip(self.layers, context):
                x = layer(x, rotary, item_rows, context_kv=kv)
        else:
            key_rotary = self.rotary_tables(position_ids)
            for layer, inputs in zip(self.layers, context):
                x = layer(x, rotary, item_rows, kv_x=torch.cat([inputs, x], dim=1), kv_rotary=key_rotary)
        return self.window_logits(self.final_norm(x), (0, m_real, m_noise))

    def window_logits(self, hidden: torch.Tensor, shape) -> torch.Tensor:
        """The head half of :meth:`forward_windows`: hidden [b, L, H] after the backbone and
        ``shape`` = (N, m_real, m_noise) -> noise-slot logits [b, W, m_noise, V_padded/tp]."""
        N, m_real, m_noise = (int(v) for v in shape)
        b, m = hidden.shape[0], m_real + m_noise
        W = (hidden.shape[1] - N) // m
        # Only the noise slots need logits: skip the head on context and real-token rows.
        out = hidden[:, N:].reshape(b, W, m, -1)[:, :, m_real:].reshape(b, W * m_noise, -1)
        return self.head(out).view(b, W, m_noise, -1)

    # ---------------------------------------------------------------- initialisation

    def init_from_teacher(self, teacher: Union[TransformerLM, Mapping[str, torch.Tensor]],
                          tp_group) -> None:
        """Copy every teacher weight (embeddings, blocks, final norm, head); the noise
        encoder keeps its fresh weights.

        ``teacher``: a TransformerLM (any TP size; its full weights are gathered over its own
        group, a collective) or a full (TP=1) state dict as from ``full_state_dict``.
        ``noise_encoder.*`` entries of a state dict are ignored (use ``from_student`` to copy
        those). ``tp_group`` is this model's group (the weights are sliced to it).
        """
        group = resolve_tp_group(tp_group)
        if isinstance(teacher, nn.Module):
            if isinstance(teacher, TransformerLM):
                _check_same_architecture(self.cfg, teacher.cfg, "the teacher")
                if teacher.padded_vocab_size != self.padded_vocab_size:
                    raise ValueError(f"the teacher's padded vocabulary ({teacher.padded_vocab_size}) "
                                     f"differs from the student's ({self.padded_vocab_size})")
            src = full_state_dict(teacher, getattr(teacher, "tp_group", group))
        elif isinstance(teacher, Mapping):
            src = teacher
        else:
            raise ValueError(f"init_from_teacher needs a TransformerLM or a full state dict, "
                             f"got {type(teacher).__name__}")
        full = {k: v for k, v in src.items() if not k.startswith(NOISE_PREFIX)}
        for name, p in self.noise_encoder.named_parameters():
            full[NOISE_PREFIX + name] = p.detach()
        load_full_state_dict(self, full, group)

    @classmethod
    def from_student(cls, prev: "PFLM", max_k: Optional[int] = None, tp_group=None) -> "PFLM":
        """A new PFLM (stage 2k) with every weight of ``prev`` (stage k), noise encoder included,
        and its noise-feature convention and masked tokens.

        max_k defaults to 2 * prev.max_k; tp_group to prev's group (another group gets the full
        weights sliced to it). The new model has prev's device and parameter dtype. The default
        RNG state is left as it was (the throw-away initialisation runs on a forked RNG).
        """
        if not isinstance(prev, PFLM):
            raise ValueError(f"from_student needs a PFLM, got {type(prev).__name__}")
        group = resolve_tp_group(prev.tp_group if tp_group is None else tp_group)
        ref = next(prev.parameters())
        with torch.random.fork_rng(devices=[]):
            new = cls(prev.cfg, prev.padded_vocab_size, group,
                      max_k=2 * prev.max_k if max_k is None else max_k,
                      noise_max_freq=prev.noise_max_freq, noise_init_std=prev.noise_init_std,
                      params_dtype=ref.dtype, noise_features=prev.noise_features,
                      masked_token_ids=prev.masked_token_ids)
        new = new.to(ref.device)
        load_full_state_dict(new, full_state_dict(prev, prev.tp_group), group)
        return new
