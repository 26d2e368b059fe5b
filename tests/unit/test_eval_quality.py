"""The quality suite on tiny models: the tau frontier (every model, every tau, finite scores and a
plot), lossless mode on real prompts (exact, with speed next to AR and PFLM), and the judge."""

from __future__ import annotations

import math

import pytest

from kforcing_dist.decode import DecodeError, generate, save_decoder
from kforcing_dist.eval.metrics import distinct_n, teacher_nll
from kforcing_dist.eval.quality import (Judge, frontier_markdown, lossless_markdown,
                                        lossless_summary, plot_frontier, quality_frontier)
from tests.unit.test_decode_generate import PROMPTS, hf_tokenizer, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_frontier_covers_every_model_and_tau(tmp_path):
    teacher = make_model("ar", seed=1)
    students = {"k2": (make_model("pflm", seed=2), 2), "k4": (make_model("pflm", seed=3), 4)}
    f = quality_frontier(teacher, students, PROMPTS, [0.5, 1.0, 2.0], sample_len=8, seed=0)
    assert list(f) == ["teacher", "k2", "k4"]
    for rows in f.values():
        assert [r["tau"] for r in rows] == [0.5, 1.0, 2.0]
        assert all(math.isfinite(r["nll"]) and r["entropy"] >= 0 for r in rows)
        assert all(0 < r["distinct_2"] <= 1 for r in rows)
    # hotter teacher samples are less likely under the teacher and more diverse
    t = f["teacher"]
    assert t[0]["nll"] < t[2]["nll"] and t[0]["entropy"] < t[2]["entropy"]
    path = plot_frontier(f, tmp_path / "frontier.png", "tiny")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "| k4 | 2 |" in "\n".join(frontier_markdown(f))


def test_lossless_summary_is_exact_and_reports_speed():
    teacher, student = make_model("ar", seed=4), make_model("pflm", seed=5)
    s = lossless_summary(teacher, student, 4, PROMPTS, new_tokens=10, tau=1.0, seed=1, repeats=1)
    assert s["exact"] and s["sequences_identical"] == len(PROMPTS)
    assert s["u_boundary_distance_at_first_difference"] == []
    assert s["acceptance_length"] >= 1 and s["tokens_per_s"] > 0
    assert s["vs_ar"] == pytest.approx(s["tokens_per_s"] / s["ar_tokens_per_s"])
    assert "equals the teacher's own" in "\n".join(lossless_markdown(s))


def test_judge_scores_like_the_teacher_and_refuses_bad_folders(tmp_path):
    teacher = make_model("ar", seed=6)
    tok = hf_tokenizer()
    folder = save_decoder(tmp_path / "judge", kind="ar", model_config=teacher.model_config,
                          padded_vocab_size=128, state_dict=teacher.state_dict(), tokenizer=tok)
    judge = Judge(folder, tok)
    samples = [[1, 2, 3], [4, 5], [6]]
    assert judge.nll(PROMPTS, samples) == pytest.approx(teacher_nll(teacher, PROMPTS, samples))
    pflm = make_model("pflm")
    pf = save_decoder(tmp_path / "pf", kind="pflm", model_config=pflm.model_config,
                      padded_vocab_size=128, state_dict=pflm.state_dict(), tokenizer=tok,
                      max_k=4, noise={"max_freq": 64.0})
    with pytest.raises(DecodeError, match="the judge must be an AR model"):
        Judge(pf, tok)
    with pytest.raises(DecodeError, match="is not a decoder folder"):
        Judge(tmp_path / "nope", tok)


def test_frontier_students_sample_with_their_per_k_penalty():
    teacher = make_model("ar", seed=1)
    k4 = make_model("pflm", seed=3)
    students = {"k2": (make_model("pflm", seed=2), 2), "k4": (k4, 4)}
    f = quality_frontier(teacher, students, PROMPTS, [1.0], sample_len=12, seed=0,
                         frequency_penalty={2: 0.3}, ignore_eos=True)
    assert [f[m][0]["frequency_penalty"] for m in ("teacher", "k2", "k4")] == [0.0, 0.3, 0.5]
    penalised = generate(k4, PROMPTS, mode="pflm", k=4, max_new_tokens=12, seed=0,
                         frequency_penalty=0.5, ignore_eos=True).tokens
    assert f["k4"][0]["distinct_2"] == pytest.approx(distinct_n(penalised, 2))
    assert f["k4"][0]["nll"] == pytest.approx(teacher_nll(teacher, PROMPTS, penalised))
    with pytest.raises(DecodeError, match="frequency_penalty"):
        quality_frontier(teacher, students, PROMPTS, [1.0], sample_len=4, seed=0, frequency_penalty=-1.0)
