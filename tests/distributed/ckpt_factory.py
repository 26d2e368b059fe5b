"""Write real training checkpoints (LMTrainer.save) of tiny models at any TP x DP x ZeRO layout.

A worker for ``run_distributed``: it builds the teacher (or a PFLM student), takes two optimizer
steps on random tokens through the real trainer, saves ``<out>/checkpoints/step-00000002`` and
returns the full weights and the logits of fixed tokens computed by the training model.
"""

from __future__ import annotations

import contextlib

import deepspeed
import torch

VOCAB = 97
SEQ = 12
BASE = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.max_seq_len=32",
        f"model.vocab_size={VOCAB}", f"train.seq_len={SEQ}", "train.max_steps=10", "train.warmup_steps=2",
        "train.lr=1e-2", "logging.tensorboard=false", "logging.progress_bar=false"]


class RandomSampler:
    """Random token batches with the state_dict interface of the real sampler."""

    def __init__(self, batch: int, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.batch, self.position = batch, 0

    def next_batch(self):
        self.position += 1
        return torch.randint(0, VOCAB, (self.batch, SEQ + 1), generator=self.gen)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def fixed_tokens():
    return torch.arange(2 * SEQ).remainder(VOCAB).view(2, SEQ) * 7 % VOCAB


def write_checkpoint(rank, world, out, tp, zero, precision, kind="teacher", extra=()):
    from kforcing_dist.config import derive_layout, load_config
    from kforcing_dist.model.state import full_state_dict
    from kforcing_dist.model.transformer import TransformerLM
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.parallel.groups import init_distributed, init_model_parallel, shutdown
    from kforcing_dist.parallel.launch import resolve_launch
    from kforcing_dist.training.task import LMTask
    from kforcing_dist.training.trainer import LMTrainer

    cfg, text = load_config(None, BASE + [f"parallel.tp={tp}", f"parallel.zero_stage={zero}",
                                          f"train.precision={precision}", "train.micro_batch_size=2",
                                          f"output_dir={out}", *extra])
    device = init_distributed(resolve_launch(), "gloo")
    groups = init_model_parallel(tp, 1, device)
    layout = derive_layout(cfg, world)
    padded = pad_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by, tp)
    torch.manual_seed(0)
    extra_meta = {"padded_vocab_size": padded, "tokenizer_fingerprint": "none"}
    if kind == "teacher":
        model = TransformerLM(cfg.model, padded, groups.tp_group)
        task = LMTask(groups.tp_group)
    else:
        model = PFLM(cfg.model, padded, groups.tp_group, max_k=2, noise_max_freq=cfg.distill.noise_max_freq)
        task = LMTask(groups.tp_group)
        task.kind = "pflm-k2"
        extra_meta.update(k=2, cdf_order=cfg.distill.cdf_order, teacher="none")
    trainer = LMTrainer(cfg, text, groups, layout, model, task, RandomSampler(2, 100 + groups.dp_rank),
                        lambda: iter(()), out, extra_metadata=extra_meta)
    for _ in range(2):
        trainer.train_step(trainer.next_batches())
    path = trainer.save()
    engine = trainer.engine
    ctx = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
           if zero == 3 else contextlib.nullcontext())
    with torch.no_grad(), ctx:
        logits = engine.module(fixed_tokens())
        full = full_state_dict(engine.module, groups.tp_group)
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=groups.tp_group)
    logits = torch.cat(parts, dim=-1)[..., :VOCAB].float()
    trainer.close()
    shutdown()
    # numpy, not tensors: tensors cross the result queue through shared-memory handles that
    # vanish with the worker process
    return {"path": str(path), "logits": logits.numpy() if rank == 0 else None,
            "weights": {k: v.float().numpy() for k, v in full.items()} if rank == 0 else None}
