"""Start a training run from converted weights (a decoder folder) at any TP size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..training.checkpoint import CheckpointError

# ModelConfig fields that may differ: they do not change the function of the weights
# (the vocabulary padding is refitted exactly by fit_vocab_rows).
_FREE_FIELDS = ("attention_backend", "init_std", "make_vocab_size_divisible_by")


def init_from_decoder(model, folder, model_cfg, tp_group, tokenizer=None) -> dict:
    """Copy an 'ar' decoder folder's weights into ``model`` (a TransformerLM or its pipeline version, any TP x PP).

    Refused with CheckpointError when the folder is not an AR model, its architecture differs from
    ``model_cfg`` (every differing field is named), or its tokenizer is not the run's.
    """
    from ..decode.errors import DecodeError
    from ..decode.format import load_decoder_tokenizer, load_decoder_weights, read_decoder_config
    from ..model.pipeline import load_plain_state_dict
    from ..training.export import fit_vocab_rows

    folder = Path(folder)
    try:
        conf = read_decoder_config(folder)
        weights = load_decoder_weights(folder, conf)
        saved_tok = load_decoder_tokenizer(folder) if tokenizer is not None else None
    except DecodeError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    if conf["kind"] != "ar":
        raise CheckpointError(f"train.init_from: {folder} holds a {conf['kind']!r} model; the teacher starts "
                              f"from an 'ar' one")
    mine = dataclasses.asdict(model_cfg)
    diff = {k: (v, mine[k]) for k, v in conf["model"].items() if k not in _FREE_FIELDS and mine[k] != v}
    if diff:
        raise CheckpointError("train.init_from: the weights' architecture differs from model.* (folder, config): "
                              + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                              + f"; set these model.* fields as in {folder / 'config.json'}")
    if saved_tok is not None and getattr(saved_tok, "fingerprint", None) != getattr(tokenizer, "fingerprint", None):
        raise CheckpointError(f"train.init_from: {folder} was made with another tokenizer than this run's data; "
                              f"prepare the data with its tokenizer (tokenizer.path={folder / 'tokenizer'})")
    try:
        load_plain_state_dict(model, fit_vocab_rows(weights, model.padded_vocab_size), tp_group)
    except ValueError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    return conf
