"""A distillation stage as a trainer task: noise, targets from the frozen teacher, slot losses.

Stage k=1 takes its targets from the AR teacher by inverse-CDF; stage 2k from the frozen
stage-k student run twice (self-forcing) or, with ``distill.higher_stage_targets:
teacher_chain``, from the AR teacher chained 2k times. The optional noise-inversion loss on
real data is added with ``distill.noise_inversion_weight``. All noise is derived from (seed,
step, global micro-batch index), so a resumed run draws exactly the noise it would have drawn,
tensor- and pipeline-parallel ranks of one replica draw the same noise, and a run at another
data-parallel size (same micro-batch size) trains on exactly the same noise as the sampler's
global order.
"""

from __future__ import annotations

import hashlib

import torch

from ..config.schema import DistillConfig
from ..nn.window import sample_window_starts


def noise_generator(seed: int, stream: str, step: int, global_micro: int) -> torch.Generator:
    """The generator of one micro-batch's noise; ``global_micro`` = micro * dp_size + dp_rank,
    the order in which the sampler hands out micro-batches (see data/sampler.py)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{step}/{global_micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class DistillTask:
    """Train loss and validation metrics of one K-Forcing stage (k slots per window)."""

    def __init__(self, k: int, dcfg: DistillConfig, groups, *, ar_teacher=None, prev_student=None):
        self.chain = k > 1 and dcfg.higher_stage_targets == "teacher_chain"
        if (k == 1 or self.chain) and ar_teacher is None:
            raise ValueError(f"stage k={k} needs the AR teacher"
                             + (" (distill.higher_stage_targets=teacher_chain)" if self.chain else ""))
        if k > 1 and not self.chain and (prev_student is None or prev_student.max_k != k // 2):
            raise ValueError(f"stage k={k} needs the frozen stage-{k // 2} student")
        if dcfg.noise_inversion_weight > 0 and ar_teacher is None:
            raise ValueError("the noise-inversion loss needs the AR teacher")
        self.k, self.dcfg, self.groups = k, dcfg, groups
        self.ar_teacher, self.prev_student = ar_teacher, prev_student
        self.kind = f"pflm-k{k}"
        self.records: list[dict[str, float]] = []  # pipeline: per-micro-batch scalars (last stage)
        # the noise encoder starts from scratch while the backbone starts trained
        self.lr_scales = {"noise_encoder.": dcfg.noise_encoder_lr_scale}

    def _draw(self, batch: torch.Tensor, gen: torch.Generator, context_len: int, max_start: int | None = None):
        b = batch.shape[0]
        d = self.dcfg
        windows = d.windows_per_sequence(self.k, context_len, None if max_start is None else max_start + 1)
        starts = sample_window_starts(b, context_len, windows, gen, max_start=max_start)
        tau = d.tau_min + (d.tau_max - d.tau_min) * torch.rand(b, generator=gen, dtype=torch.float64)
        return starts.to(batch.device), tau.to(batch.device)

    def _draw_slots(self, batch: torch.Tensor, gen: torch.Generator):
        """(window starts, noise u [b, W, k], tau) of one micro-batch, in this fixed RNG order.
        With ``noise_draws_per_start`` R > 1 every drawn start appears R times in a row, each copy a
        window with its own u: more targets per context pass (the targets at one start share the
        teacher's distribution, but not the noise)."""
        starts, tau = self._draw(batch, gen, batch.shape[1])
        if self.dcfg.noise_draws_per_start > 1:
            starts = starts.repeat_interleave(self.dcfg.noise_draws_per_start, dim=1)
        u = torch.rand((*starts.shape, self.k), generator=gen, dtype=torch.float64).to(batch.device)
        return starts, u, tau

    def _generator(self, step: int | None, micro: int) -> torch.Generator:
        """The noise generator of micro-batch ``micro`` of ``step``; None: validation batch ``micro``."""
        if step is None:
            return noise_generator(self.dcfg.seed, "valid", 0, self._global_micro(micro))
        return noise_generator(self.dcfg.seed, "train", step, self._global_micro(micro))

    def _targets(self, context: torch.Tensor, starts, u, tau):
        from .targets import self_forcing_targets, stage1_targets, teacher_chain_targets

        tp = self.groups.tp_group
        if self.k == 1:
            distinct, draws = self._distinct_starts(starts, u)
            return stage1_targets(self.ar_teacher, context, distinct, draws, tau, self.dcfg.cdf_order, tp,
                                  self.dcfg.teacher_min_p).reshape(u.shape)
        if self.chain:
            return teacher_chain_targets(self.ar_teacher, context, starts, u, tau, self.dcfg.cdf_order, tp,
                                         self.dcfg.teacher_min_p)
        return self_forcing_targets(self.prev_student, context, starts, u, tau, tp)

    def _distinct_starts(self, starts: torch.Tensor, u: torch.Tensor):
        """Stage 1's (distinct starts [b, W], their draws [b, W, R]) from the drawn windows, whose
        R copies of each start sit in a row (:meth:`_draw_slots`): G then builds the teacher's
        CDF once per start."""
        r = self.dcfg.noise_draws_per_start
        return starts[:, ::r], u.reshape(u.shape[0], -1, r)

    def _loss(self, engine, batch: torch.Tensor, gen: torch.Generator):
        from .losses import slot_metrics
        from .targets import noise_inversion_batch

        k, d = self.k, self.dcfg
        starts, u, tau = self._draw_slots(batch, gen)
        targets = self._targets(batch, starts, u, tau)
        logits = engine(batch, starts, u, tau, context_gradients=d.context_gradients)
        loss, metrics = slot_metrics(logits, targets, self.groups.tp_group)
        out = self._flatten(metrics, "")
        if d.noise_inversion_weight > 0:
            # real continuation x_{t+1..t+k} must exist: the last k tokens serve only as targets
            context_len = batch.shape[1] - k
            inv_starts, inv_tau = self._draw(batch, gen, context_len, max_start=context_len - 1)
            inv_u, inv_targets = noise_inversion_batch(self.ar_teacher, batch, inv_starts, k, inv_tau,
                                                       d.cdf_order, gen, self.groups.tp_group)
            inv_logits = engine(batch[:, :context_len], inv_starts, inv_u, inv_tau,
                                context_gradients=d.context_gradients)
            inv_loss, inv_metrics = slot_metrics(inv_logits, inv_targets, self.groups.tp_group)
            out.update(self._flatten(inv_metrics, "inv_"))
            out["distill_loss"] = float(loss.detach())
            loss = loss + d.noise_inversion_weight * inv_loss
        return loss, out

    @staticmethod
    def _flatten(metrics: dict, prefix: str) -> dict[str, float]:
        """slot_metrics' dict -> flat scalars: acc, block_match, acc_slot1.., loss_slot1.."""
        out = {}
        for name, value in metrics.items():
            if name.endswith("_per_slot"):
                for i, v in enumerate(value):
                    out[f"{prefix}{name[:-len('_per_slot')]}_slot{i + 1}"] = float(v)
            elif name != "loss" or prefix:  # the unprefixed loss is the trainer's own "loss"
                out[f"{prefix}{name}"] = float(value)
        return out

    def _global_micro(self, micro: int) -> int:
        return micro * self.groups.dp_size + self.groups.dp_rank

    # ---------------------------------------------------------------- pipeline parallelism
    # The engine pulls (inputs, labels) per micro-batch: the first stage embeds the inputs, the
    # last computes the loss against the labels (the targets). The frozen teacher runs on the
    # same stage layout first, for all micro-batches, so its targets appear on the last stage.

    def pipe_micro_batches(self, batches: list[torch.Tensor], step: int | None) -> list[tuple]:
        """(inputs, labels) per micro-batch; ``step`` None means validation batches (noise by index)."""
        draws = [(batch, *self._draw_slots(batch, self._generator(step, i))) for i, batch in enumerate(batches)]
        targets = self._pipe_targets(draws)
        no_label = torch.zeros(1, dtype=torch.long)  # stages before the last never read labels
        return [((batch, starts, u, tau, batch.new_zeros((*starts.shape, 0))),
                 targets[i] if targets is not None else no_label)
                for i, (batch, starts, u, tau) in enumerate(draws)]

    def _pipe_targets(self, draws):
        from .targets import self_forcing_targets_pipelined, stage1_targets_from_logits

        if self.chain:  # config validation refuses it first
            raise ValueError("distill.higher_stage_targets=teacher_chain needs parallel.pp = 1")
        if self.k > 1:
            return self_forcing_targets_pipelined(self.prev_student, draws, self.groups)
        logits = self.ar_teacher([batch for batch, _, _, _ in draws])
        if logits is None:
            return None
        return [stage1_targets_from_logits(out, *self._distinct_starts(starts, u), tau, self.dcfg.cdf_order,
                                           self.groups.tp_group, self.ar_teacher.vocab_size,
                                           self.dcfg.teacher_min_p).reshape(u.shape)
                for out, (_, starts, u, tau) in zip(logits, draws)]

    def pipe_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The student's loss on the last stage; records the micro-batch's scalars."""
        from .losses import slot_metrics

        loss, metrics = slot_metrics(logits, targets, self.groups.tp_group)
        self.records.append({"loss": metrics["loss"], **self._flatten(metrics, "")})
        return loss

    def train_loss(self, engine, batch: torch.Tensor, step: int, micro: int):
        return self._loss(engine, batch, self._generator(step, micro))

    def eval_loss(self, engine, batch: torch.Tensor, index: int):
        return self._loss(engine, batch, self._generator(None, index))
