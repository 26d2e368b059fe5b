"""Hugging Face import/export: tiny random GPT-2 / Llama / GPT-NeoX built with transformers on CPU.

Import: our decoder's logits equal transformers' logits. Export: transformers loads the folder
(AutoModelForCausalLM.from_pretrained) and its logits equal ours. Unrepresentable models are refused.
"""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kforcing_dist.config.schema import ModelConfig  # noqa: E402
from kforcing_dist.convert.hf import export_hf, import_hf  # noqa: E402
from kforcing_dist.decode import load_decoder  # noqa: E402
from kforcing_dist.decode.format import save_decoder  # noqa: E402
from kforcing_dist.decode.model import DecoderLM  # noqa: E402
from kforcing_dist.training.checkpoint import CheckpointError  # noqa: E402

VOCAB = 101


class _Payload:
    """An arbitrary class: unpickling it would mean running code named by the file."""
TOL = 2e-5


def _gpt2(tie=True):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                  layer_norm_epsilon=1e-4, tie_word_embeddings=tie, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _randomise(model, seed):
    # transformers initialises norms to 1 and biases to 0: random values make every mapping count
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _ids():
    return torch.tensor([[5, 17, 3, 99, 42, 8, 0, 64, 23, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 100]])


def _import_to_decoder(folder, out):
    m, padded, weights, _ = import_hf(folder)
    save_decoder(out, kind="ar", model_config=m, padded_vocab_size=padded, state_dict=weights)
    return load_decoder(out)


@pytest.mark.parametrize("build", [_gpt2, _llama, lambda: _gpt2(tie=False)], ids=["gpt2", "llama", "gpt2-untied"])
def test_import_then_export_matches_transformers(build, tmp_path, one_thread):
    hf = _randomise(build(), 0)
    hf.save_pretrained(tmp_path / "hf")
    dec = _import_to_decoder(tmp_path / "hf", tmp_path / "ours")
    with torch.no_grad():
        want = hf(_ids()).logits
    got = dec.logits(_ids())[..., :VOCAB]
    assert (got - want).abs().max().item() < TOL
    assert dec.padded_vocab_size % 64 == 0 and dec.padded_vocab_size > VOCAB

    export_hf(tmp_path / "ours", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        again = back(_ids()).logits
    assert (again - got).abs().max().item() < TOL


def _our_decoder(tmp_path, tokenizer=None, **model):
    vocab = tokenizer.vocab_size if tokenizer is not None else VOCAB
    padded = -(-vocab // 64) * 64
    base = dict(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64)
    conf = {"format": "kforcing-dist-decoder/1", "kind": "ar", "padded_vocab_size": padded,
            "model": {**dataclasses.asdict(ModelConfig()), **base, **model}}
    dec = DecoderLM(conf).init_random_(seed=3, std=0.3)
    sd = {k: v for k, v in dec.state_dict().items()}
    with torch.no_grad():  # random norms and biases too
        gen = torch.Generator().manual_seed(4)
        for k in sd:
            if "norm" in k or k.endswith("bias"):
                sd[k] = torch.randn(sd[k].shape, generator=gen) * 0.3
    save_decoder(tmp_path / "ours", kind="ar", model_config=conf["model"], padded_vocab_size=padded, state_dict=sd,
                 tokenizer=tokenizer)
    return load_decoder(tmp_path / "ours")


def test_default_architecture_exports_as_gpt_neox(tmp_path, one_thread):
    # the paper's block: bias-free LayerNorm, tanh GELU, rotate-half rope, untied head
    dec = _our_decoder(tmp_path, rope_base=500.0)
    export_hf(tmp_path / "ours", tmp_path / "neox")
    cfg = json.loads((tmp_path / "neox" / "config.json").read_text())
    assert cfg["model_type"] == "gpt_neox" and cfg["use_parallel_residual"] is False
    # readable as the umask allows (safetensors alone writes 0600)
    from kforcing_dist.fsio import current_umask
    assert (tmp_path / "neox" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "neox").eval()
    with torch.no_grad():
        want = back(_ids()).logits
    assert (dec.logits(_ids())[..., :VOCAB] - want).abs().max().item() < TOL
    # and back in: the same function
    dec2 = _import_to_decoder(tmp_path / "neox", tmp_path / "again")
    assert (dec2.logits(_ids()) - dec.logits(_ids()))[..., :VOCAB].abs().max().item() < TOL


def test_unrepresentable_models_are_refused(tmp_path):
    _our_decoder(tmp_path, lm_head_bias=True)
    with pytest.raises(CheckpointError, match="non-zero bias"):
        export_hf(tmp_path / "ours", tmp_path / "x")
    (tmp_path / "o2").mkdir()
    _our_decoder(tmp_path / "o2", norm="rmsnorm", activation="gelu_tanh")
    with pytest.raises(CheckpointError, match="no transformers"):
        export_hf(tmp_path / "o2" / "ours", tmp_path / "y")


def test_broken_hf_folders_are_refused(tmp_path):
    hf = _gpt2()
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(CheckpointError, match="h.2.ln_1.weight"):
        import_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function"):
        import_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    data = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "hf" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        import_hf(tmp_path / "hf")
    # a pickled .bin with an arbitrary object is refused, not executed
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1), "obj": _Payload()}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        import_hf(tmp_path / "hf")


def _sentencepiece(model_type):
    import random

    from kforcing_dist.data.tokenizer import train_sentencepiece

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    tails = ["Ünïcödé — 中文", "a\tb", "x  y"]
    docs = [" ".join(rng.choice(words) for _ in range(60)) + " 12 345.\n" + rng.choice(tails) for _ in range(300)]
    return train_sentencepiece(docs, 400, model_type=model_type)


# edge cases of SentencePiece's normalisation: leading/double spaces, newlines and tabs (byte pieces),
# digits, characters never seen in training (byte fallback), an empty text
TEXTS = ["Hello world", " leading space", "two  spaces\n\nnew\tlines", "1234567 digits", "🙂 unseen 𝔘 ž",
         "", " ", "trailing  "]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_tokenizer_converts_to_the_same_ids(model_type):
    from kforcing_dist.convert.hf import spm_to_tokenizers

    sp = _sentencepiece(model_type)
    fast, unk = spm_to_tokenizers(sp.defining_files()[0][1])
    assert unk == "<unk>"
    for text in TEXTS:
        ids = fast.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert fast.decode(ids, skip_special_tokens=False) == sp.decode(ids), text


def test_exported_folder_loads_with_auto_tokenizer_and_generates_like_our_decoder(tmp_path, one_thread):
    sp = _sentencepiece("unigram")
    dec = _our_decoder(tmp_path, tokenizer=sp, rope_base=500.0)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = "two  spaces and 42 digits\n🙂"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == sp.encode(prompt)  # no BOS added: training never did
    assert tok.eos_token_id == sp.eos_id and tok.decode(ids[0]) == prompt
    with torch.no_grad():
        hf_out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=sp.eos_id)[0, ids.shape[1]:].tolist()
        ours = ids
        for _ in range(8):  # greedy with our decoder's logits
            nxt = dec.logits(ours)[0, -1, :sp.vocab_size].argmax()
            ours = torch.cat([ours, nxt.view(1, 1)], 1)
    assert hf_out == ours[0, ids.shape[1]:].tolist()
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    assert pipe(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith(prompt)


def test_hf_tokenizer_without_config_gets_one_naming_its_eos(tmp_path):
    # a bare tokenizer.json (EOS found by name): AutoTokenizer needs tokenizer_config.json to know it
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from kforcing_dist.data.tokenizer import HFTokenizer

    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(VOCAB - 2)]
    raw = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = WhitespaceSplit()
    ours = HFTokenizer({"tokenizer.json": raw.to_str().encode()})
    _our_decoder(tmp_path, tokenizer=ours)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "</s>" and tok.eos_token_id == ours.eos_id == 1
    assert tok("w3 w7 w98").input_ids == ours.encode("w3 w7 w98") == [5, 9, 100]


@pytest.mark.parametrize("family,model", [
    ("gpt2", dict(position="learned", norm="layernorm", norm_bias=True, activation="gelu_tanh", qkv_bias=True,
                  attn_out_bias=True, mlp_bias=True)),
    ("llama", dict(norm="rmsnorm", activation="swiglu", num_kv_heads=2, qkv_bias=True, attn_out_bias=True,
                   mlp_bias=True)),
    ("gpt_neox", dict(norm="layernorm", norm_bias=True, activation="gelu_tanh", qkv_bias=True, attn_out_bias=True,
                      mlp_bias=True))])
def test_each_family_table_is_its_own_inverse(family, model):
    """Export then import through one family's table gives back every tensor exactly (every
    transform's inverse, with every optional bias present), and names no tensor twice."""
    from kforcing_dist.convert.hf import FAMILIES, weights_from_hf, weights_to_hf

    m = {**dataclasses.asdict(ModelConfig()), "vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2,
         "num_heads": 4, "max_seq_len": 64, "tie_embeddings": False, **model}
    conf = {"format": "kforcing-dist-decoder/1", "kind": "ar", "padded_vocab_size": VOCAB, "model": m}
    gen = torch.Generator().manual_seed(5)
    ours = {k: torch.randn(v.shape, generator=gen) for k, v in DecoderLM(conf).state_dict().items()
            if not k.endswith("lm_head.bias")}
    theirs = weights_to_hf(family, m, ours)
    assert len(theirs) == sum(1 for _ in FAMILIES[family].rules) + \
        m["num_layers"] * len(FAMILIES[family].layer) + 1  # + the untied head
    back = weights_from_hf(family, m, theirs, "test")
    assert back.keys() == ours.keys()
    for name, value in ours.items():
        assert torch.equal(back[name], value), name
