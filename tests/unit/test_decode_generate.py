"""Batched generation: AR sampling and PFLM decoding against step-by-step references without a
cache, seeding, EOS handling, masked tokens, the request checks and the text helpers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kforcing_dist.config.schema import DecodeConfig, ModelConfig
from kforcing_dist.decode import (FORMAT_VERSION, DecodeError, Decoder, DecoderLM, decode_kwargs,
                                  generate, generate_text, load_decoder, save_decoder)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

V = 100



def make_model(kind="ar", seed=0, std=0.3, masked=(), eos_id=None, max_k=4, **model_kw) -> DecoderLM:
    m = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=40)
    m.update(model_kw)
    cfg = {"format": FORMAT_VERSION, "kind": kind,
           "model": dataclasses.asdict(ModelConfig(**m)), "padded_vocab_size": 128,
           "max_k": max_k if kind == "pflm" else None,
           "noise": {"max_freq": 64.0} if kind == "pflm" else None,
           "masked_token_ids": list(masked), "eos_id": eos_id}
    return DecoderLM(cfg).init_random_(seed, std=std)


PROMPTS = [[5, 17, 3, 9, 1], [42], [7, 7, 8]]


def reference_ar(model, prompts, n, tau, seed, penalty=0.0):
    """Sampling with the full (cache-free) forward and the same generator draws."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [list(p) for p in prompts]
    counts = torch.zeros(len(prompts), V)
    for _ in range(n):
        logits = torch.stack([model.logits(torch.tensor([s]))[0, -1, :V] for s in seqs])
        logits = logits - penalty * counts
        new = torch.multinomial(torch.softmax(logits / tau, -1), 1, generator=gen)[:, 0]
        for s, t in zip(seqs, new.tolist()):
            s.append(t)
        counts[torch.arange(len(seqs)), new] += 1
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def reference_pflm(model, prompts, n, k, tau, seed, penalty=0.0):
    """Block by block without a cache; new token i of sequence b uses u[b, i] of one table.
    The penalty follows the authors' rule, one sequence and one slot at a time: slot j's argmax
    is taken on logits_j - penalty * counts with slots 1..j-1 of its block already counted."""
    u_all = torch.rand((len(prompts), n), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)
    seqs = [list(p) for p in prompts]
    counts = torch.zeros(len(prompts), V)
    done = 0
    while done < n:
        u = u_all[:, done:done + k]
        m = min(k, n - done)
        for b, s in enumerate(seqs):
            logits = model.pflm_logits(torch.tensor([s]), u[b:b + 1, :m], tau)[0, :, :V]
            for j in range(m):
                t = int((logits[j] - penalty * counts[b]).argmax())
                s.append(t)
                counts[b, t] += 1
        done += m
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_ar_matches_cache_free_reference_and_is_seeded():
    model = make_model("ar")
    res = generate(model, PROMPTS, mode="ar", max_new_tokens=9, tau=0.8, seed=3)
    assert res.tokens == reference_ar(model, PROMPTS, 9, 0.8, 3)
    assert res.steps == 9 and res.new_tokens == 27 and res.finished == [False] * 3
    assert res.seconds > 0 and res.prefill_seconds > 0 and res.mode == "ar"
    again = generate(model, PROMPTS, mode="ar", max_new_tokens=9, tau=0.8, seed=3)
    assert again.tokens == res.tokens
    other = generate(model, PROMPTS, mode="ar", max_new_tokens=9, tau=0.8, seed=4)
    assert other.tokens != res.tokens


def test_ar_frequency_penalty():
    model = make_model("ar")
    res = generate(model, PROMPTS, mode="ar", max_new_tokens=6, tau=0.5, seed=1, frequency_penalty=2.0)
    assert res.tokens == reference_ar(model, PROMPTS, 6, 0.5, 1, penalty=2.0)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_pflm_matches_cache_free_reference(k):
    model = make_model("pflm")
    res = generate(model, PROMPTS, mode="pflm", k=k, max_new_tokens=10, tau=0.9, seed=5)
    assert res.tokens == reference_pflm(model, PROMPTS, 10, k, 0.9, 5)
    assert res.steps == -(-10 // k) and res.new_tokens == 30 and res.k == k


def test_pflm_frequency_penalty_and_seed():
    model = make_model("pflm", std=0.5)
    plain = generate(model, PROMPTS, mode="pflm", k=4, max_new_tokens=12, seed=2)
    pen = generate(model, PROMPTS, mode="pflm", k=4, max_new_tokens=12, seed=2, frequency_penalty=5.0)
    assert pen.tokens == reference_pflm(model, PROMPTS, 12, 4, 1.0, 2, penalty=5.0)
    assert pen.tokens != plain.tokens
    assert generate(model, PROMPTS, mode="pflm", k=4, max_new_tokens=12, seed=2).tokens == plain.tokens
    assert generate(model, PROMPTS, mode="pflm", k=4, max_new_tokens=12, seed=9).tokens != plain.tokens


def biased(model, token: int, bias: float):
    """Make ``token`` likely (the head bias adds to every context's logits)."""
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[token] = bias
    return model


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("cuda_graphs", [False, True])  # True on a CPU: the static-shape steps
def test_pflm_penalty_counts_earlier_slots_of_the_same_block(k, cuda_graphs):
    # token 7 wins every slot without a penalty (bias 10 against logits of about +-1); with
    # penalty 20 the authors' rule lets it win slot 1 of the first block only: from slot 2 on it
    # is counted, 10 - 20 < the rest. Counting once per block would repeat it k times.
    model = biased(make_model("pflm", std=0.3, lm_head_bias=True), 7, 10.0)
    kw = dict(mode="pflm", k=k, max_new_tokens=10, tau=0.9, seed=6, cuda_graphs=cuda_graphs)
    plain = generate(model, PROMPTS, **kw).tokens
    assert all(row == [7] * 10 for row in plain)
    res = generate(model, PROMPTS, frequency_penalty=20.0, **kw)
    assert res.tokens == reference_pflm(model, PROMPTS, 10, k, 0.9, 6, penalty=20.0)
    assert all(row[0] == 7 and row.count(7) == 1 for row in res.tokens)
    # a moderate penalty on the unbiased model: still the slot-by-slot reference, batch-wide
    model = make_model("pflm", std=0.5)
    for penalty in (0.5, 3.0):
        got = generate(model, PROMPTS, frequency_penalty=penalty, **{**kw, "max_new_tokens": 11})
        assert got.tokens == reference_pflm(model, PROMPTS, 11, k, 0.9, 6, penalty=penalty)


def test_pflm_penalty_fast_and_plain_steps_agree():
    model = make_model("pflm", std=0.5)
    kw = dict(mode="pflm", k=4, max_new_tokens=12, seed=2, frequency_penalty=2.0)
    fast = generate(model, PROMPTS, **kw).tokens
    model.fast = False
    assert generate(model, PROMPTS, **kw).tokens == fast


@pytest.mark.parametrize("penalty", [-0.5, float("nan"), float("inf"), True, {2: 0.3}])
def test_generate_refuses_bad_penalties(penalty):
    with pytest.raises(DecodeError, match="frequency_penalty must be a finite number >= 0"):
        generate(make_model("pflm"), PROMPTS, mode="pflm", k=2, max_new_tokens=2,
                 frequency_penalty=penalty)


def test_learned_positions_reach_max_seq_len():
    """prompt + max_new_tokens == max_seq_len is allowed: the last PFLM step drops the unneeded
    trailing slots instead of running past the position table."""
    model = make_model("pflm", position="learned", max_seq_len=16)
    prompts = [list(range(1, 7)), [3]]
    res = generate(model, prompts, mode="pflm", k=4, max_new_tokens=10, seed=0)
    assert [len(t) for t in res.tokens] == [10, 10]
    assert res.tokens == reference_pflm(model, prompts, 10, 4, 1.0, 0)
    ar = make_model("ar", position="learned", max_seq_len=16)
    assert len(generate(ar, prompts, mode="ar", max_new_tokens=10).tokens[0]) == 10


@pytest.mark.parametrize("mode, k", [("ar", 1), ("pflm", 3)])
def test_eos_stops_one_sequence_while_others_continue(mode, k):
    model = make_model(mode)
    kw = dict(mode=mode, k=k, max_new_tokens=12, seed=4)
    free = generate(model, PROMPTS, **kw).tokens
    # an EOS id that sequence 0 emits (first at step j) and sequence 1 and 2 never do
    candidates = [t for t in free[0] if t not in free[1] and t not in free[2]]
    assert candidates, "random model produced no usable EOS candidate"
    eos = candidates[0]
    j = free[0].index(eos)
    res = generate(model, PROMPTS, eos_id=eos, **kw)
    assert res.tokens[0] == free[0][:j + 1]
    assert res.tokens[1:] == free[1:]
    assert res.finished == [True, False, False]
    assert res.new_tokens == j + 1 + 24
    assert res.steps == -(-12 // k)
    # the checkpoint's eos_id is the default
    model.eos_id = eos
    assert generate(model, PROMPTS, **kw).tokens == res.tokens


@pytest.mark.parametrize("mode", ["ar", "pflm"])
def test_all_finished_stops_the_loop(mode):
    model = make_model(mode, lm_head_bias=True, eos_id=2)
    with torch.no_grad():
        model.lm_head.bias[2] = 1e3  # EOS always wins
    res = generate(model, PROMPTS, mode=mode, k=2 if mode == "pflm" else 1, max_new_tokens=10)
    assert res.tokens == [[2], [2], [2]] and res.finished == [True] * 3
    assert res.steps == 1 and res.new_tokens == 3


def test_masked_token_never_emitted():
    model = make_model("ar", lm_head_bias=True, masked=[11])
    with torch.no_grad():
        model.lm_head.bias[11] = 1e3  # would always win if it were not masked
    assert torch.all(model.logits(torch.tensor([[1, 2]]))[..., 11] == -1000.0)
    res = generate(model, PROMPTS, mode="ar", max_new_tokens=8, tau=5.0)
    assert all(11 not in t for t in res.tokens)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="pflm", k=5), r"k=5 exceeds the checkpoint's max_k=4"),
    (dict(mode="pflm", k=0), "k must be a positive integer"),
    (dict(mode="ar"), "mode='ar' needs an AR checkpoint"),
    (dict(mode="beam"), "mode must be one of"),
    (dict(mode="pflm", prompts=[[1], []]), "prompt 1 is empty"),
    (dict(mode="pflm", prompts=[]), "non-empty list"),
    (dict(mode="pflm", prompts=[[1, 100]]), r"token id 100 outside \[0, 100\)"),
    (dict(mode="pflm", prompts=[[-1]]), r"token id -1 outside"),
    (dict(mode="pflm", prompts=[[1] * 30], max_new_tokens=11), "41 > model.max_seq_len=40"),
    (dict(mode="pflm", max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(mode="pflm", tau=0.0), "tau must be a positive"),
    (dict(mode="pflm", eos_id=100), "eos_id must be None or a token id"),
    (dict(mode="pflm", device="meta"), "the model is on cpu"),
])
def test_request_errors_pflm_checkpoint(kw, match):
    model = make_model("pflm")
    kw = {"prompts": [[1, 2]], "max_new_tokens": 4, **kw}
    with pytest.raises(DecodeError, match=match):
        generate(model, kw.pop("prompts"), **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="pflm", k=2), "mode='pflm' needs a PFLM checkpoint"),
    (dict(mode="ar", k=2), "k=2 is the PFLM block size"),
    (dict(mode="ar", prompts=[[1] * 10], max_new_tokens=31), "max_seq_len"),
])
def test_request_errors_ar_checkpoint(kw, match):
    model = make_model("ar", position="learned")
    kw = {"prompts": [[1, 2]], "max_new_tokens": 4, **kw}
    with pytest.raises(DecodeError, match=match):
        generate(model, kw.pop("prompts"), **kw)


def test_forward_step_errors():
    model = make_model("ar")
    cache = model.allocate_cache(2, 6)
    with pytest.raises(DecodeError, match="no noise encoder"):
        model.forward_step(cache, torch.zeros(2, 1, dtype=torch.long), noise_u=torch.rand(2, 2))
    with pytest.raises(DecodeError, match="cache holds 6"):
        model.forward_step(cache, torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(DecodeError, match="num_new"):
        model.forward_step(cache, torch.zeros(2, 3, dtype=torch.long), num_new=[4, 1])
    with pytest.raises(DecodeError, match="needs input_ids and/or noise_u"):
        model.forward_step(cache)
    assert cache.host_lengths.tolist() == [0, 0]


def hf_tokenizer():
    """A tiny word-level Hugging Face tokenizer (w0 .. w98 and </s>) built in memory."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.decoders import WordPiece  # joins tokens with spaces

    from kforcing_dist.data.tokenizer import HFTokenizer

    vocab = {f"w{i}": i for i in range(V - 1)}
    vocab["</s>"] = V - 1
    tok = HFTok(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.decoder = WordPiece(prefix="##")
    return HFTokenizer({"tokenizer.json": tok.to_str().encode()})


def test_decoder_class_and_generate_text(tmp_path):
    model = make_model("pflm")
    tok = hf_tokenizer()
    folder = save_decoder(tmp_path / "pf", kind="pflm", model_config=model.model_config,
                          padded_vocab_size=128, state_dict=model.state_dict(), tokenizer=tok,
                          max_k=4, noise={"max_freq": 64.0})
    assert json.loads((folder / "config.json").read_text())["eos_id"] == V - 1  # from the tokenizer
    dec = Decoder(folder)
    assert dec.kind == "pflm" and dec.tokenizer.fingerprint == tok.fingerprint
    texts = ["w5 w17 w3", "w42"]
    res = dec.generate_text(texts, k=2, max_new_tokens=6, seed=1)
    prompts = [tok.encode(t) for t in texts]
    assert res.tokens == generate(load_decoder(folder), prompts, mode="pflm", k=2,
                                  max_new_tokens=6, seed=1).tokens
    for t, toks, fin in zip(res.texts, res.tokens, res.finished):
        assert t == tok.decode(toks[:-1] if fin else toks)
    with pytest.raises(DecodeError, match="encodes to no tokens"):
        generate_text(dec.model, tok, ["w1", ""], mode="pflm", max_new_tokens=2)
    with pytest.raises(DecodeError, match="needs a tokenizer"):
        generate_text(dec.model, None, ["w1"], mode="pflm", max_new_tokens=2)


def test_decode_kwargs_from_config():
    cfg = DecodeConfig(k=2, tau=0.7, max_new_tokens=5, frequency_penalty=0.5, seed=3)
    model = make_model("pflm")
    res = generate(model, PROMPTS, **decode_kwargs(cfg, "pflm"))
    assert res.k == 2 and all(len(t) == 5 for t in res.tokens)
    assert decode_kwargs(cfg, "ar")["k"] == 1
    # the penalty is resolved for the mode and k: a number is for every decode, AR included;
    # a per-k map or null (the authors' values) is for the PFLM only
    assert decode_kwargs(cfg, "ar")["frequency_penalty"] == 0.5
    for setting, pflm, ar in ((None, 0.3, 0.0), ({2: 0.2, 4: 0.4}, 0.2, 0.0), ({4: 0.4}, 0.3, 0.0),
                              (0, 0.0, 0.0)):
        cfg = DecodeConfig(k=2, frequency_penalty=setting)
        assert decode_kwargs(cfg, "pflm")["frequency_penalty"] == pflm
        assert decode_kwargs(cfg, "ar")["frequency_penalty"] == ar
    # flags replace the config: k (the penalty then resolved for it) and the penalty setting
    cfg = DecodeConfig(k=2, frequency_penalty=None)
    assert decode_kwargs(cfg, "pflm", k=4)["frequency_penalty"] == 0.5 and decode_kwargs(cfg, "pflm", k=4)["k"] == 4
    assert decode_kwargs(cfg, "pflm", frequency_penalty={2: 0.1})["frequency_penalty"] == 0.1
    assert decode_kwargs(cfg, "ar", frequency_penalty=0.7)["frequency_penalty"] == 0.7


def test_speed_run_reports_median_and_leaves_eos_alone():
    from kforcing_dist.decode.bench import speed_run

    model = make_model("pflm", eos_id=3)
    r = speed_run(model, mode="pflm", k=4, batch=2, prompt_len=5, new_tokens=8, repeats=3)
    assert r["steps"] == 2 and r["batch"] == 2 and len(r["all_tokens_per_second"]) == 3
    assert r["tokens_per_second"] > 0 and model.eos_id == 3


def test_generate_command_resolves_the_penalty_for_its_k(tmp_path, capsys):
    from kforcing_dist.cli import main

    model = make_model("pflm", std=0.5)
    tok = hf_tokenizer()
    folder = save_decoder(tmp_path / "pf", kind="pflm", model_config=model.model_config,
                          padded_vocab_size=128, state_dict=model.state_dict(), tokenizer=tok,
                          max_k=4, noise={"max_freq": 64.0})
    (tmp_path / "p.txt").write_text("w5 w17 w3\nw42\n")
    base = ["generate", "--model", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out",
            str(tmp_path / "o.jsonl"), "--k", "2", "--set", "decode.max_new_tokens=8"]

    def run(*extra):
        assert main(base + list(extra)) == 0
        return [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]

    prompts = [tok.encode("w5 w17 w3"), tok.encode("w42")]
    for extra, penalty in (((), 0.3), (("--set", "decode.frequency_penalty={2: 4.0}"), 4.0),
                           (("--frequency-penalty", "0"), 0.0)):
        rows = run(*extra)
        assert [r["frequency_penalty"] for r in rows] == [penalty] * 2
        want = generate(model, prompts, mode="pflm", k=2, max_new_tokens=8,
                        frequency_penalty=penalty, eos_id=V - 1).tokens
        assert [r["tokens"] for r in rows] == want
    assert main(base + ["--frequency-penalty", "-1"]) == 2
    assert "frequency_penalty must be a finite number >= 0" in capsys.readouterr().err
