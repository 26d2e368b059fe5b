"""The released-model parity fixture (tests/fixtures/released_parity) and the reference checks
shared by the decoder, TP=1 and TP=2 tests: import both files with the library's importer, run
them, and compare with what the paper authors' own model code computed."""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "released_parity"
V, NUM_HEADS, MAX_K, MASK_TOKEN = 61, 4, 4, 60
MAX_SEQ_LEN = 64  # not recorded in the files; anything >= context + k slots
TOL = 1e-5


def random_released_state_dict(V: int, H: int, num_heads: int, num_layers: int, pflm: bool, seed: int = 0,
                               std: float = 0.3) -> dict[str, torch.Tensor]:
    """A state dict in the documented released layout (``backbone.`` names) with random weights."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * std  # noqa: E731
    hd = H // num_heads
    sd = {"backbone.vocab_embed.embedding": r(V, H),
          "backbone.rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))}
    for i in range(num_layers):
        p = f"backbone.blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(H), p + "attn_qkv.weight": r(3 * H, H), p + "attn_out.weight": r(H, H),
                   p + "norm2.weight": 1 + r(H), p + "mlp.0.weight": r(4 * H, H), p + "mlp.0.bias": r(4 * H),
                   p + "mlp.2.weight": r(H, 4 * H), p + "mlp.2.bias": r(H)})
    sd.update({"backbone.output_layer.norm_final.weight": 1 + r(H), "backbone.output_layer.linear.weight": r(V, H),
               "backbone.output_layer.linear.bias": r(V)})
    if pflm:
        sd.update({"backbone.noise_encoder.combined_proj.weight": r(H, 2 * H),
                   "backbone.noise_encoder.combined_proj.bias": r(H),
                   "backbone.noise_encoder.norm.weight": 1 + r(H), "backbone.noise_encoder.norm.bias": r(H),
                   "backbone.noise_encoder.mlp.0.weight": r(4 * H, H), "backbone.noise_encoder.mlp.0.bias": r(4 * H),
                   "backbone.noise_encoder.mlp.2.weight": r(H, 4 * H), "backbone.noise_encoder.mlp.2.bias": r(H)})
    return sd


def reference() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "reference_outputs.pt", weights_only=True)


def imported(kind: str) -> dict:
    """save_decoder's keyword arguments for ``ar`` or ``pflm`` (the library importer)."""
    from kforcing_dist.convert.released import import_released

    return import_released(FIXTURES / f"{kind}_ref.ckpt", num_heads=NUM_HEADS, max_seq_len=MAX_SEQ_LEN,
                           mask_token_id=MASK_TOKEN, max_k=MAX_K if kind == "pflm" else None)


def errors(ar_logits: torch.Tensor, pflm_logits: torch.Tensor, ref: dict) -> dict:
    """Max |difference| of AR log-probs and PFLM logits from the reference (first V entries),
    and whether the PFLM argmax is the reference's tokens."""
    ar_logprobs = ar_logits[..., :V].float().log_softmax(-1)
    pflm = pflm_logits[..., :V].float()
    return {"ar": (ar_logprobs - ref["ar_logprobs"]).abs().max().item(),
            "pflm": (pflm - ref["pflm_logits"]).abs().max().item(),
            "tokens": bool(torch.equal(pflm.argmax(-1), ref["pflm_tokens"]))}


def _gather_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def tp_model_errors(tp_group, build=None) -> dict:
    """Build the training models (TransformerLM, PFLM) at the group's TP size from the imported
    weights and compare their outputs with the reference (collective over ``tp_group``).

    ``build(model_cfg, padded, max_k, noise, masked_token_ids)`` makes a model (max_k 0: the AR
    one); default: the TransformerLM / PFLM constructors."""
    import torch.distributed as dist

    from kforcing_dist.config.schema import ModelConfig
    from kforcing_dist.model import TransformerLM, load_full_state_dict
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.model.student import PFLM
    from kforcing_dist.training.export import fit_vocab_rows

    def construct(model_cfg, padded, max_k, noise, masked):
        if not max_k:
            return TransformerLM(model_cfg, padded, tp_group, masked_token_ids=masked)
        return PFLM(model_cfg, padded, tp_group, max_k=max_k, noise_features=noise["features"],
                    noise_max_freq=noise["max_freq"], masked_token_ids=masked)

    build = build or construct
    ref = reference()
    models = []
    for fields in (imported("ar"), imported("pflm")):
        cfg = ModelConfig(**fields["model_config"])
        padded = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, dist.get_world_size(tp_group))
        model = build(cfg, padded, fields["max_k"] or 0, fields["noise"], fields["masked_token_ids"])
        load_full_state_dict(model, fit_vocab_rows(fields["state_dict"], padded), tp_group)
        models.append(model)
    teacher, student = models
    ctx = ref["context"]
    b, n = ctx.shape
    with torch.no_grad():
        ar_logits = _gather_vocab(teacher(ctx), tp_group)
        # one window per sequence, starting at the last context position: 4 slots after the context
        starts = torch.full((b, 1), n - 1, dtype=torch.long)
        slots = student.forward_windows(ctx, starts, ref["noise"][:, None, :], ref["tau"])
        pflm_logits = _gather_vocab(slots[:, 0], tp_group)
    return errors(ar_logits, pflm_logits, ref)


def pipeline_model_errors(groups, layout) -> dict | None:
    """The same check through the pipeline-parallel modules (``build_model`` at ``layout.pp`` > 1,
    forward-only engines); the last stage returns the errors, the others None."""
    from kforcing_dist.config.schema import ModelConfig
    from kforcing_dist.nn.sizes import pad_vocab_size
    from kforcing_dist.model.pipeline import PipelineForward, build_model, load_plain_state_dict
    from kforcing_dist.training.engine import build_frozen_pipeline_engine
    from kforcing_dist.training.export import fit_vocab_rows

    ref = reference()
    ctx = ref["context"]
    b, n = ctx.shape
    starts = torch.full((b, 1), n - 1, dtype=torch.long)
    inputs = {"ar": ctx, "pflm": (ctx, starts, ref["noise"][:, None, :], ref["tau"].double(),
                                  ctx.new_zeros((b, 1, 0)))}
    out = {}
    for kind in ("ar", "pflm"):
        fields = imported(kind)
        cfg = ModelConfig(**fields["model_config"])
        padded = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, layout.tp)
        pipe = build_model(cfg, padded, groups, layout.pp, max_k=fields["max_k"] or 0, noise=fields["noise"],
                           masked_token_ids=fields["masked_token_ids"])
        load_plain_state_dict(pipe, fit_vocab_rows(fields["state_dict"], padded), groups)
        logits = PipelineForward(build_frozen_pipeline_engine(pipe, layout))([inputs[kind]])
        out[kind] = None if logits is None else logits[0]
    if out["ar"] is None:
        return None
    return errors(_gather_vocab(out["ar"], groups.tp_group), _gather_vocab(out["pflm"][:, 0], groups.tp_group), ref)
