"""``kforcing-dist convert``: a TP=2 x PP=2 teacher checkpoint consolidates to the training run's own
export; resharded to TP=1 x PP=1 it resumes training exactly where the TP=2 x PP=2 run stood (same
data, weights and learning rate: the first resumed step's loss and gradient norm equal the source
run's), and both consolidate to decoders with the same logits; a DP change under ZeRO-0 carries the
Adam moments."""

from __future__ import annotations

import json

import torch

from kforcing_dist.convert.safeload import load_torch_file
from kforcing_dist.decode import load_decoder
from kforcing_dist.training.metrics import read_log
from tests.conftest import SMOKE, run_cli


def test_reshard_tp2_pp2_to_tp1_resumes_and_keeps_logits(smoke_shards, tmp_path):
    common = ["-c", SMOKE, "--set", f"data.shards_dir={smoke_shards}", "--set", "train.max_steps=6",
              "--set", "checkpoint.save_interval=4", "--set", "train.eval_interval=0",
              "--set", "logging.tensorboard=false", "--set", "train.log_interval=1"]
    tp2, tp1 = tmp_path / "tp2", tmp_path / "tp1"
    run_cli("--standalone", "--nproc_per_node=4", "-m", "kforcing_dist", "train-teacher", "-o", tp2, *common,
            "--set", "parallel.tp=2", "--set", "parallel.pp=2", "--set", "parallel.zero_stage=1",
            module="torch.distributed.run")
    src = tp2 / "checkpoints" / "step-00000004"
    assert (src / "engine" / "layer_01-model_01-model_states.pt").is_file()  # pipeline layer files
    # offline consolidation of the pipeline checkpoint == the export the live TP2 x PP2 run gathered
    run_cli("convert", "consolidate", "--checkpoint", tp2 / "checkpoints" / "step-00000006", "--out",
            tmp_path / "last")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    live, offline = (load_decoder(f).logits(ids)[..., :512] for f in (tp2 / "export", tmp_path / "last"))
    assert (live - offline).abs().max().item() < 1e-5

    proc = run_cli("convert", "reshard", "--checkpoint", src, "-o", tp1, "--set", "parallel.tp=1",
                   "--set", "parallel.pp=1", "--set", "parallel.zero_stage=0")
    assert "optimizer state (Adam moments) is RESET" in proc.stdout
    meta = json.loads((tp1 / "checkpoints" / "step-00000004" / "metadata.json").read_text())
    assert meta["layout"]["tp"] == 1 and meta["layout"]["pp"] == 1 and "tp 2->1" in meta["optimizer_reset"]
    assert meta["resharded_from"]["layout"]["tp"] == 2 and meta["resharded_from"]["layout"]["pp"] == 2

    for name, ck in (("a", src), ("b", tp1 / "checkpoints" / "step-00000004")):
        run_cli("convert", "consolidate", "--checkpoint", ck, "--out", tmp_path / name)
    a, b = (load_decoder(tmp_path / n).logits(ids)[..., :512] for n in ("a", "b"))
    assert (a - b).abs().max().item() < 1e-5

    # a new run started from converted weights (train.init_from) begins where those weights were;
    # a token the folder masks (a released model's mask token; here unk, which byte fallback never
    # emits) stays masked in the new teacher
    conf = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**conf, "masked_token_ids": [0]}))
    proc = run_cli("train-teacher", "-o", tmp_path / "init", *common, "--set", "train.max_steps=1",
                   "--set", f"train.init_from={tmp_path / 'a'}")
    assert "teacher initialised from" in proc.stderr
    assert json.loads((tmp_path / "init" / "export" / "config.json").read_text())["masked_token_ids"] == [0]
    first = {r["step"]: r for r in read_log(tmp_path / "init", "train")}[1]

    proc = run_cli("train-teacher", "-o", tp1, *common)
    assert "resumed from" in proc.stderr and "step-00000004" in proc.stderr
    ref = {r["step"]: r for r in read_log(tp2, "train")}
    new = {r["step"]: r for r in read_log(tp1, "train")}
    assert sorted(new) == [5, 6]
    # step 5 is computed before the optimizer update: same weights, data and LR schedule as TP=2
    assert abs(new[5]["loss"] - ref[5]["loss"]) < 1e-5
    assert abs(new[5]["grad_norm"] - ref[5]["grad_norm"]) < 1e-4
    assert new[5]["lr"] == ref[5]["lr"] and new[6]["lr"] == ref[6]["lr"]
    assert first["loss"] < ref[1]["loss"] - 0.05  # the same first batch, on the step-4 weights

    # ZeRO-0 at DP 1 -> 2: DeepSpeed's optimizer files fit, so the Adam moments are carried unchanged
    dp2 = tmp_path / "dp2"
    proc = run_cli("--standalone", "--nproc_per_node=2", "-m", "kforcing_dist", "convert", "reshard",
                   "--checkpoint", tp1, "-o", dp2, "--set", "train.micro_batch_size=8",
                   "--set", "train.global_batch_size=16", module="torch.distributed.run")
    assert "optimizer state was carried over" in proc.stdout
    a, b = (load_torch_file(r / "checkpoints" / "step-00000006" / "engine" / "mp_rank_00_model_states.pt",
                            deepspeed_objects=True) for r in (tp1, dp2))
    assert a["optimizer"]["state"] and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert a["lr_scheduler"] == b["lr_scheduler"] and b["global_steps"] == 6
    meta = json.loads((dp2 / "checkpoints" / "step-00000006" / "metadata.json").read_text())
    assert meta["layout"]["dp"] == 2 and "optimizer_reset" not in meta

    # and back onto a pipeline: TP=1 -> PP=2 writes pipeline layer files with the same weights
    pp2 = tmp_path / "pp2"
    run_cli("--standalone", "--nproc_per_node=2", "-m", "kforcing_dist", "convert", "reshard",
            "--checkpoint", tp1, "-o", pp2, "--set", "parallel.pp=2", "--set", "parallel.zero_stage=1",
            module="torch.distributed.run")
    assert (pp2 / "checkpoints" / "step-00000006" / "engine" / "layer_03-model_00-model_states.pt").is_file()
    for name, ck in (("c", tp1), ("d", pp2)):
        run_cli("convert", "consolidate", "--checkpoint", ck, "--out", tmp_path / name)
    c, d = (load_decoder(tmp_path / n).logits(ids)[..., :512] for n in ("c", "d"))
    assert (c - d).abs().max().item() < 1e-5


def test_convert_refusals_exit_2(tmp_path):
    proc = run_cli("convert", "consolidate", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("convert", "from-kforcing", "--checkpoint", tmp_path / "a.ckpt", "--out", tmp_path / "y",
                   check=False)
    assert proc.returncode == 2 and "--num-heads is required" in proc.stderr


def _word_tokenizer(folder, words: int):
    """A local Hugging Face word-level tokenizer folder: w0 .. w{words-2} and </s> (the EOS)."""
    from tokenizers import Tokenizer
    from tokenizers.decoders import WordPiece
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"w{i}": i for i in range(words - 1)}
    vocab["</s>"] = words - 1
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.decoder = WordPiece(prefix="##")
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_from_kforcing_released_pflm_then_generate(tmp_path):
    """`convert from-kforcing` of the authors' reference PFLM records the released noise features by
    itself; the folder reproduces the authors' logits and `generate` decodes k=4 tokens a step."""
    from tests.released_parity import FIXTURES, MASK_TOKEN, TOL, V, reference

    out = tmp_path / "pflm"
    tok = _word_tokenizer(tmp_path / "tok", V - 1)  # every id but the mask token
    flags = ["--checkpoint", FIXTURES / "pflm_ref.ckpt", "--num-heads", 4, "--max-seq-len", 64,
             "--mask-token-id", MASK_TOKEN, "--max-k", 4]
    run_cli("convert", "from-kforcing", *flags, "--tokenizer", tok, "--out", out)
    conf = json.loads((out / "config.json").read_text())
    assert conf["noise"] == {"features": "released", "max_freq": None} and conf["masked_token_ids"] == [MASK_TOKEN]
    ref = reference()
    got = load_decoder(out).pflm_logits(ref["context"], ref["noise"], ref["tau"])[..., :V]
    assert (got - ref["pflm_logits"]).abs().max().item() < TOL

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4\nw7 w7 w8\n")
    proc = run_cli("generate", "--model", out, "--prompts", prompts, "--set", "decode.max_new_tokens=8")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all(r["mode"] == "pflm" and r["k"] == 4 for r in rows)
    assert all(len(r["tokens"]) == 8 and MASK_TOKEN not in r["tokens"] for r in rows)

    proc = run_cli("convert", "from-kforcing", *flags, "--noise-max-freq", 256, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --noise-max-freq" in proc.stderr


def test_imported_released_pflm_continues_distilling(smoke_shards, tmp_path):
    """A released k=4 PFLM imported with from-kforcing starts stage k8: placed where the stage-4
    export is expected (at TP=2), or named by distill.init_from_student (TP=1). The k8 student keeps
    the released noise features and the mask token, and starts from the imported weights; with an
    imported released AR model as the run's teacher, `evaluate` reports both stages."""
    from tests.released_parity import random_released_state_dict

    vocab, mask = 513, 512  # the smoke tokenizer's 512 tokens + a mask token, like the OWT release
    imported = tmp_path / "a" / "k4" / "export"
    for kind, out in (("pflm", imported), ("ar", tmp_path / "a" / "teacher" / "export")):
        ckpt = tmp_path / f"{kind}.ckpt"
        torch.save({"state_dict": random_released_state_dict(vocab, 32, 4, 2, pflm=kind == "pflm", seed=3)}, ckpt)
        run_cli("convert", "from-kforcing", "--checkpoint", ckpt, "--num-heads", 4, "--max-seq-len", 128,
                "--mask-token-id", mask, "--max-k", 4, "--out", out)
    common = ["-c", SMOKE, "--set", f"data.shards_dir={smoke_shards}", "--set", "distill.stages=[1,2,4,8]",
              "--set", "distill.stage_steps=[1,1,1,2]", "--set", "distill.seq_len=16",
              "--set", "distill.micro_batch_size=2", "--set", "distill.max_window_slots=16",
              "--set", "train.eval_batches=1", "--set", "logging.tensorboard=false",
              # a negligible step: the k8 student must still compute what the imported k4 one does
              "--set", "distill.lr=1e-9", "--set", "distill.min_lr=0", "--set", "distill.warmup_steps=0"]
    run_cli("--standalone", "--nproc_per_node=2", "-m", "kforcing_dist", "distill", "--stage", "k8",
            "-o", tmp_path / "a", *common, "--set", "parallel.tp=2", module="torch.distributed.run")
    run_cli("distill", "--stage", "k8", "-o", tmp_path / "b", *common,
            "--set", f"distill.init_from_student={imported}")

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    u = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    want = load_decoder(imported).pflm_logits(ids, u, 0.9)[..., :vocab]
    for run in ("a", "b"):
        export = tmp_path / run / "k8" / "export"
        conf = json.loads((export / "config.json").read_text())
        assert conf["max_k"] == 8 and conf["noise"]["features"] == "released" and conf["masked_token_ids"] == [mask]
        got = load_decoder(export).pflm_logits(ids, u, 0.9)[..., :vocab]
        assert (got - want).abs().max().item() < 1e-4, run
        first = read_log(tmp_path / run / "k8", "train")[0]
        # slots 1..4 are the frozen k4 student's own outputs: the copy agrees with them exactly
        assert all(first[f"acc_slot{i}"] == 1.0 for i in range(1, 5)), first

    # the TP=2 training checkpoint records the convention and the mask token: consolidate keeps them
    run_cli("convert", "consolidate", "--checkpoint", tmp_path / "a" / "k8", "--out", tmp_path / "c")
    conf = json.loads((tmp_path / "c" / "config.json").read_text())
    assert conf["noise"]["features"] == "released" and conf["masked_token_ids"] == [mask]

    run_cli("evaluate", "-o", tmp_path / "a", *common, "--set", "eval.num_contexts=4", "--set", "eval.num_samples=2",
            "--set", "eval.sample_len=8", "--set", "eval.speed_batches=[1]", "--set", "eval.speed_repeats=1",
            "--set", "eval.frontier_taus=[]", "--set", "eval.lossless=false")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert set(report["stages"]) == {"k4", "k8"} and len(report["stages"]["k8"]["slot_agreement"]) == 8
