"""train.init_from: a teacher run starts from a decoder folder's weights (refitted vocabulary padding)."""

import dataclasses

import pytest
import torch

from kforcing_dist.config.schema import ModelConfig
from kforcing_dist.convert.init import init_from_decoder
from kforcing_dist.decode.format import save_decoder
from kforcing_dist.model.state import full_state_dict
from kforcing_dist.model.transformer import TransformerLM
from kforcing_dist.training.checkpoint import CheckpointError

CFG = ModelConfig(vocab_size=90, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16)


def test_init_from_decoder_copies_weights_and_refuses_mismatches(groups, tmp_path, one_thread):
    torch.manual_seed(0)
    src = TransformerLM(CFG, 256, groups.tp_group)  # padded as if trained at TP=4
    save_decoder(tmp_path / "dec", kind="ar", model_config=CFG, padded_vocab_size=256,
                 state_dict=full_state_dict(src, groups.tp_group))
    torch.manual_seed(1)
    dst = TransformerLM(dataclasses.replace(CFG, init_std=0.05), 128, groups.tp_group)
    init_from_decoder(dst, tmp_path / "dec", dst.cfg, groups.tp_group)
    ids = torch.randint(0, 90, (2, 10))
    with torch.no_grad():
        assert torch.equal(dst(ids)[..., :90], src(ids)[..., :90])

    other = TransformerLM(dataclasses.replace(CFG, rope_base=500.0), 128, groups.tp_group)
    with pytest.raises(CheckpointError, match="rope_base: 10000.0 vs 500.0"):
        init_from_decoder(other, tmp_path / "dec", other.cfg, groups.tp_group)
    with pytest.raises(CheckpointError, match="does not exist"):
        init_from_decoder(dst, tmp_path / "nope", dst.cfg, groups.tp_group)
