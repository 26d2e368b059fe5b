"""The paper's released checkpoint format: a state dict in the documented layout with random weights.

The reference forward below is written from the format description alone (fused qkv rows laid out
(q|k|v, head, head_dim), bias-free LayerNorm, rotate-half rotary from the stored inv_freq, tanh GELU,
untied head with bias, mask token at -1000); the imported decoder must compute the same logits.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kforcing_dist.convert.released import import_released
from kforcing_dist.decode import load_decoder
from kforcing_dist.decode.format import save_decoder
from kforcing_dist.training.checkpoint import CheckpointError
from tests.released_parity import random_released_state_dict

V, H, NH, L, S = 50, 32, 4, 2, 16
MASK = V - 1


def _released(pflm: bool, seed=0):
    return random_released_state_dict(V, H, NH, L, pflm, seed)


def _reference_logits(sd, ids):
    """The released model's AR forward, from the documented format only."""
    w = {k[len("backbone."):]: v for k, v in sd.items()}
    hd = H // NH
    ln = lambda x, wt: F.layer_norm(x, (H,), wt, None, 1e-5)  # noqa: E731
    x = w["vocab_embed.embedding"][ids]
    s = ids.shape[1]
    ang = torch.arange(s).float()[:, None] * w["rotary_emb.inv_freq"][None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(t):
        a, b = t.chunk(2, -1)
        return t * cos + torch.cat([-b, a], -1) * sin

    for i in range(L):
        p = f"blocks.{i}."
        qkv = ln(x, w[p + "norm1.weight"]) @ w[p + "attn_qkv.weight"].t()
        q, k, v = (t.view(ids.shape[0], s, NH, hd).transpose(1, 2) for t in qkv.split(H, -1))
        att = (rot(q) @ rot(k).transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(ids.shape[0], s, H) @ w[p + "attn_out.weight"].t()
        h = F.gelu(ln(x, w[p + "norm2.weight"]) @ w[p + "mlp.0.weight"].t() + w[p + "mlp.0.bias"], approximate="tanh")
        x = x + h @ w[p + "mlp.2.weight"].t() + w[p + "mlp.2.bias"]
    logits = (ln(x, w["output_layer.norm_final.weight"]) @ w["output_layer.linear.weight"].t()
              + w["output_layer.linear.bias"])
    logits[..., MASK] = -1000.0
    return logits


@pytest.mark.parametrize("pflm", [False, True], ids=["ar", "pflm"])
def test_released_format_imports_with_same_logits(pflm, tmp_path, one_thread):
    sd = _released(pflm)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "model.ckpt")
    fields = import_released(tmp_path / "model.ckpt", num_heads=NH, max_seq_len=S, mask_token_id=MASK,
                             max_k=4 if pflm else None)
    assert fields["kind"] == ("pflm" if pflm else "ar")
    m = fields["model_config"]
    assert (m["num_layers"], m["hidden_size"], m["ffn_hidden_size"], m["rope_base"]) == (L, H, 4 * H, 10000.0)
    assert m["norm_bias"] is False and m["lm_head_bias"] and not m["tie_embeddings"]
    save_decoder(tmp_path / "dec", **fields)
    dec = load_decoder(tmp_path / "dec")
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(1))
    got = dec.logits(ids)[..., :V]
    assert (got - _reference_logits(sd, ids)).abs().max().item() < 1e-4
    assert bool((got.argmax(-1) != MASK).all())
    if pflm:  # the noise encoder is in place: a PFLM forward runs
        out = dec.pflm_logits(ids[:, :4], torch.rand(2, 4, generator=torch.Generator().manual_seed(2)))
        assert out.shape[:2] == (2, 4) and bool(torch.isfinite(out).all())


def test_wrong_or_truncated_released_files_are_refused(tmp_path):
    sd = _released(False)
    torch.save({"state_dict": sd}, tmp_path / "ok.ckpt")
    with pytest.raises(CheckpointError, match="rotary"):  # a wrong head count does not fit inv_freq
        import_released(tmp_path / "ok.ckpt", num_heads=2, max_seq_len=S, mask_token_id=MASK)
    part = {k: v for k, v in sd.items() if ".blocks.0." not in k}
    torch.save({"state_dict": part}, tmp_path / "part.ckpt")
    with pytest.raises(CheckpointError, match="missing"):
        import_released(tmp_path / "part.ckpt", num_heads=NH, max_seq_len=S, mask_token_id=MASK)
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        import_released(tmp_path / "cut.ckpt", num_heads=NH, max_seq_len=S, mask_token_id=MASK)
    torch.save({"state_dict": {**sd, "backbone.extra.weight": torch.zeros(2)}}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match="outside the documented"):
        import_released(tmp_path / "extra.ckpt", num_heads=NH, max_seq_len=S, mask_token_id=MASK)
    torch.save({"state_dict": _released(True)}, tmp_path / "pflm.ckpt")
    with pytest.raises(CheckpointError, match="max_k"):
        import_released(tmp_path / "pflm.ckpt", num_heads=NH, max_seq_len=S, mask_token_id=MASK)

