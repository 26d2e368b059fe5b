"""The run report's measures against hand-made models whose answers are known: chance and mode
baselines from the teacher's probabilities, the chained k/2 comparison, per-sample entropy,
batched NLL, the tau-range warning, and the report's keys on tiny decoder folders."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from kforcing_dist.config.schema import Config
from kforcing_dist.decode import DecodeError, save_decoder
from kforcing_dist.nn.inverse_cdf import inverse_cdf_sample
from kforcing_dist.eval.metrics import (agreement, entropy_per_sample, teacher_nll, teacher_path,
                                        unigram_entropy)
from kforcing_dist.eval.report import evaluate_run, resolve_sample_len, tau_warnings
from tests.unit.test_decode_generate import PROMPTS, V, hf_tokenizer, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

START = 3  # every context ends in this token
# next-token distribution given the last token: the path matters (after 0 the teacher is unsure,
# after 1 it is sure), so "per-slot averages multiplied" and "the greedy block" differ
TABLE = torch.tensor([[0.2, 0.3, 0.5, 0.0],
                      [0.1, 0.9, 0.0, 0.0],
                      [0.25, 0.25, 0.25, 0.25],
                      [0.6, 0.4, 0.0, 0.0]], dtype=torch.float64)


@dataclasses.dataclass
class NoCache:
    length: torch.Tensor


class TableTeacher:
    """An AR 'model' whose next-token distribution is TABLE[last token] (it needs no cache)."""
    vocab_size = 4
    device = torch.device("cpu")

    def allocate_cache(self, batch, capacity):
        return NoCache(torch.zeros(batch, dtype=torch.long))

    def forward_step(self, cache, ids, output):
        assert output == "last"
        cache.length += ids.shape[1]
        return torch.log(TABLE[ids[:, -1]]).float()


def _g(last: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The teacher's inverse-CDF token (vocab order) after ``last`` for noise ``u``."""
    cdf = TABLE[last].cumsum(-1)
    return torch.searchsorted(cdf, u[:, None].double(), right=True)[:, 0]


class PathStudent:
    """A PFLM 'model' whose slot i emits ``pick(previous token, u_i)``, chained inside its block
    (so with ``pick=_g`` it reproduces the teacher's sequential sample exactly)."""
    vocab_size = 4
    device = torch.device("cpu")

    def __init__(self, pick, max_k=4):
        self.pick, self.max_k = pick, max_k

    def pflm_logits(self, context, u, tau=1.0):
        last, out = context[:, -1], []
        for i in range(u.shape[1]):
            last = self.pick(last, u[:, i])
            out.append(torch.nn.functional.one_hot(last, 4).float())
        return torch.stack(out, 1)


class ChainedStudent:
    """A stage-k 'student' that runs ``previous`` twice, as the self-forcing target is made."""
    vocab_size = 4
    device = torch.device("cpu")

    def __init__(self, previous):
        self.previous = previous

    def pflm_logits(self, context, u, tau=1.0):
        h = u.shape[1] // 2
        first = self.previous.pflm_logits(context, u[:, :h]).argmax(-1)
        second = self.previous.pflm_logits(torch.cat([context, first], 1), u[:, h:])
        return torch.cat([torch.nn.functional.one_hot(first, 4).float(), second], 1)


def always(token):
    return lambda last, u: torch.full_like(last, token)


CONTEXTS = torch.full((20000, 2), START)


def test_teacher_path_reads_chance_and_mode_off_the_teacher_probabilities():
    u = torch.tensor([[0.1, 0.9], [0.7, 0.05], [0.55, 0.25]], dtype=torch.float64)
    path = teacher_path(TableTeacher(), CONTEXTS[:3], u, 1.0, "vocab")
    assert path.tokens.tolist() == [[0, 2], [1, 0], [0, 1]]
    after0, after1 = 0.04 + 0.09 + 0.25, 0.01 + 0.81  # sum p^2 after token 0 / token 1
    assert path.chance[:, 0].tolist() == pytest.approx([0.52] * 3)          # 0.6^2 + 0.4^2
    assert path.chance[:, 1].tolist() == pytest.approx([after0, after1, after0])
    assert path.mode_prob.flatten().tolist() == pytest.approx([0.6, 0.5, 0.6, 0.9, 0.6, 0.5])
    assert path.mode.tolist() == [[0, 2], [0, 1], [0, 2]]
    assert path.token_prob.flatten().tolist() == pytest.approx([0.6, 0.5, 0.4, 0.1, 0.6, 0.3])
    # the greedy chain (0, then 2) whatever the sampled path: 0.6, then 0.6 * 0.5
    assert path.greedy_prob.flatten().tolist() == pytest.approx([0.6, 0.3] * 3)
    assert path.first(1).tokens.tolist() == [[0], [1], [0]]


def test_teacher_path_of_a_min_p_teacher_uses_the_truncated_probabilities():
    # min_p 0.5: after 3, (0.6, 0.4) stays; after 0, 0.2 is cut: (0, 0.375, 0.625); after 1, only 1 stays
    u = torch.tensor([[0.1, 0.9], [0.7, 0.05], [0.1, 0.3]], dtype=torch.float64)
    path = teacher_path(TableTeacher(), CONTEXTS[:3], u, 1.0, "vocab", min_p=0.5)
    assert path.tokens.tolist() == [[0, 2], [1, 1], [0, 1]]  # untruncated, the last would be [0, 1] too
    assert path.chance[:, 1].tolist() == pytest.approx([0.375 ** 2 + 0.625 ** 2, 1.0, 0.375 ** 2 + 0.625 ** 2])
    assert path.mode_prob.flatten().tolist() == pytest.approx([0.6, 0.625, 0.4 / 0.4 * 0.6, 1.0, 0.6, 0.625])
    assert path.token_prob[:, 1].tolist() == pytest.approx([0.625, 1.0, 0.375])
    # the first slot's 0.2-wide interval of token 0 after token 0 is gone: u 0.1 falls in token 1's
    assert teacher_path(TableTeacher(), torch.tensor([[0, 0]]), torch.tensor([[0.1]], dtype=torch.float64), 1.0,
                        "vocab", min_p=0.5).tokens.tolist() == [[1]]


def test_cached_teacher_path_equals_the_full_forward_chain():
    teacher = make_model("ar", seed=8, std=0.5)
    contexts = torch.randint(0, 99, (5, 6), generator=torch.Generator().manual_seed(0))
    u = torch.rand(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    path = teacher_path(teacher, contexts, u, 0.8, "sorted", batch_size=2)
    seq, greedy, chain = contexts, contexts, torch.ones(5, dtype=torch.float64)
    for i in range(3):
        logits = teacher.logits(seq)[:, -1, :V]
        p = torch.softmax(logits.double() / 0.8, -1)
        y = inverse_cdf_sample(logits, u[:, i], 0.8, "sorted")
        assert path.tokens[:, i].tolist() == y.tolist()
        assert path.chance[:, i].tolist() == pytest.approx((p * p).sum(-1).tolist(), rel=1e-4)
        assert path.token_prob[:, i].tolist() == pytest.approx(p.gather(1, y[:, None])[:, 0].tolist(), rel=1e-4)
        best, mode = torch.softmax(teacher.logits(greedy)[:, -1, :V].double() / 0.8, -1).max(-1)
        chain = chain * best
        assert path.greedy_prob[:, i].tolist() == pytest.approx(chain.tolist(), rel=1e-4)
        seq, greedy = torch.cat([seq, y[:, None]], 1), torch.cat([greedy, mode[:, None]], 1)


def test_mode_baseline_and_block_chance_are_the_teacher_s_exact_values():
    s = agreement(TableTeacher(), PathStudent(always(0)), CONTEXTS, 2, 1.0, "vocab", seed=0)
    # slot 1: every context has p = (0.6, 0.4): exact
    assert s["mode_baseline"]["slot"][0] == pytest.approx(0.6)
    assert s["chance_level_per_slot"][0] == pytest.approx(0.52) and s["chance_level"] == pytest.approx(0.52)
    # slot 2 along the teacher's path: E[max p] = 0.6 * 0.5 + 0.4 * 0.9
    assert s["mode_baseline"]["slot"][1] == pytest.approx(0.66, abs=0.01)
    # block mode: the greedy block (0, 2) has probability 0.6 * 0.5 in every context: exact
    assert s["mode_baseline"]["block"] == pytest.approx(0.3)
    # block chance: sum_y P(y)^2 = 0.36 * 0.38 + 0.16 * 0.82 = 0.268 (per-slot chances
    # multiplied along the path would give 0.52 * 0.556 = 0.289)
    assert s["block_chance"] == pytest.approx(0.268, abs=0.006)
    # a student that always emits token 0 agrees at slot 1 exactly as often as the mode baseline
    assert s["slot_agreement"][0] == pytest.approx(0.6, abs=0.01)
    assert s["mode_rate"][0] == 1.0 and "vs_previous" not in s


def test_a_u_blind_greedy_student_sits_on_the_mode_baseline_and_a_perfect_one_above():
    greedy = PathStudent(lambda last, u: TABLE[last].argmax(-1))
    g = agreement(TableTeacher(), greedy, CONTEXTS, 2, 1.0, "vocab", seed=1)
    assert g["block_agreement"] == pytest.approx(g["mode_baseline"]["block"], abs=0.01)
    assert g["slot_agreement"][0] == pytest.approx(g["mode_baseline"]["slot"][0], abs=0.01)
    perfect = agreement(TableTeacher(), PathStudent(_g), CONTEXTS, 2, 1.0, "vocab", seed=1)
    assert perfect["slot_agreement"] == [1.0, 1.0] and perfect["block_agreement"] == 1.0
    # a student that uses u emits the teacher's mode only as often as the teacher samples it
    assert perfect["mode_rate"][0] == pytest.approx(0.6, abs=0.01)


def test_vs_previous_separates_inherited_from_new_error():
    teacher = TableTeacher()
    # a k/2 student that imitates the teacher, and a stage-2 student that is exactly its chain
    prev = PathStudent(_g, max_k=1)
    s = agreement(teacher, ChainedStudent(prev), CONTEXTS[:500], 2, 1.0, "vocab", seed=2,
                  previous=prev)
    assert s["vs_previous"]["slot_agreement"] == [1.0, 1.0] and s["vs_previous"]["block_agreement"] == 1.0
    # a wrong k/2 student: the chained copy of it still agrees 100% with its target, and the
    # whole gap to the teacher is inherited
    wrong = PathStudent(lambda last, u: (_g(last, u) + (u > 0.8).long()) % 4, max_k=1)
    s = agreement(teacher, ChainedStudent(wrong), CONTEXTS[:500], 2, 1.0, "vocab", seed=2,
                  previous=wrong)
    assert s["vs_previous"]["slot_agreement"] == [1.0, 1.0]
    inherited = s["vs_previous"]["previous_vs_teacher"]
    assert inherited["slot_agreement"] == s["slot_agreement"] and s["block_agreement"] < 0.9
    # and a stage-2 student that is the teacher itself disagrees with that wrong target
    s = agreement(teacher, PathStudent(_g), CONTEXTS[:500], 2, 1.0, "vocab", seed=2, previous=wrong)
    assert s["slot_agreement"] == [1.0, 1.0] and s["vs_previous"]["block_agreement"] < 0.9
    assert s["vs_previous"]["previous_vs_teacher"]["block_agreement"] == s["vs_previous"]["block_agreement"]


def test_entropy_per_sample_sees_loops_that_the_pooled_entropy_hides():
    loops = [[1, 1, 1, 1], [2, 2, 2, 2]]
    assert unigram_entropy(loops) == pytest.approx(math.log(2))
    assert entropy_per_sample(loops) == 0.0
    varied = [[1, 2], [1, 2, 3, 4]]
    assert entropy_per_sample(varied) == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert entropy_per_sample([[], [5, 6]]) == pytest.approx(math.log(2))


def test_batched_teacher_nll_equals_one_sequence_at_a_time():
    teacher = make_model("ar", seed=7)
    conts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    one = teacher_nll(teacher, PROMPTS, conts, batch_size=1)
    assert teacher_nll(teacher, PROMPTS, conts, batch_size=16) == pytest.approx(one, rel=1e-6)


def test_tau_range_warning_and_sample_length():
    taus = {"decode.tau": 1.0, "eval.frontier_taus[0]": 0.7}
    assert tau_warnings("k4", {"source": {}}, taus) == []
    (w,) = tau_warnings("k4", {"tau_range": [0.8, 1.2]}, taus)
    assert "k4" in w and "eval.frontier_taus[0]=0.7" in w and "decode.tau" not in w
    assert "decode.tau=1.3 lies outside" in tau_warnings("k4", {"tau_range": [0.8, 1.2]}, {"decode.tau": 1.3})[0]
    assert "not [min, max]" in tau_warnings("k4", {"tau_range": [2, 1]}, taus)[0]
    model = make_model("ar")  # max_seq_len 40
    assert resolve_sample_len(6, 0, [model]) == 34 and resolve_sample_len(6, 10, [model]) == 10
    with pytest.raises(DecodeError, match="eval.sample_len=40"):
        resolve_sample_len(6, 40, [model])


def _tiny_run(root):
    """Decoder folders of random tiny models (teacher, k1, k2) and a valid split of token shards."""
    from kforcing_dist.data.shards import ShardWriter, write_metadata

    tok = hf_tokenizer()
    for name, model in (("teacher", make_model("ar", seed=1)), ("k1", make_model("pflm", seed=2, max_k=1)),
                        ("k2", make_model("pflm", seed=3, max_k=2))):
        kw = {"max_k": model.max_k, "noise": {"max_freq": 64.0}} if model.kind == "pflm" else {}
        save_decoder(root / name / "export", kind=model.kind, model_config=model.model_config,
                     padded_vocab_size=128, state_dict=model.state_dict(), tokenizer=tok, **kw)
    cfg_path = root / "k2" / "export" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "tau_range": [1.0, 1.0]}))
    writer = ShardWriter(root / "data" / "valid", np.uint16, 10 ** 6)
    writer.add(np.random.default_rng(0).integers(0, 99, 400))
    write_metadata(root / "data", {"format_version": 1, "tokenizer": {}, "vocab_size": 100, "eos_id": 99,
                                   "dtype": "uint16", "splits": {"valid": writer.finish()}})
    cfg = Config()
    cfg.output_dir, cfg.data.shards_dir = str(root), str(root / "data")
    cfg.distill.stages = [1, 2]
    cfg.decode.frequency_penalty = {2: 0.3}  # k1 takes the authors' default (0.5)
    ev = cfg.eval
    ev.num_contexts, ev.context_len, ev.num_samples, ev.prompt_len = 6, 5, 3, 4
    ev.frontier_taus, ev.frontier_samples = [1.0, 1.5], 2
    ev.speed_batches, ev.speed_new_tokens, ev.speed_context, ev.speed_repeats = [1], 4, 3, 1
    return cfg


def test_report_has_the_new_keys(tmp_path):
    r = evaluate_run(_tiny_run(tmp_path), tmp_path)
    assert r == json.loads((tmp_path / "report.json").read_text())
    assert r["decode"] == {"tau": 1.0, "frequency_penalty": {"k1": 0.5, "k2": 0.3}, "prompt_len": 4,
                           "sample_len": 36, "seed": 0, "cdf_order": {"k1": "vocab", "k2": "vocab"},
                           "teacher_min_p": 0.0, "ignore_eos": True, "teacher_sampling": "multinomial"}
    assert list(r["samples"]) == ["teacher", "data", "k1", "k1@p0", "k2", "k2@p0"]
    for name, s in r["samples"].items():
        assert s["tokens"] == 3 * 36 and 0 < s["entropy_per_sample"] <= s["entropy"], name
    assert r["samples"]["k2"]["frequency_penalty"] == 0.3 and r["samples"]["k2@p0"]["frequency_penalty"] == 0.0
    k1, k2 = r["stages"]["k1"], r["stages"]["k2"]
    assert len(k1["mode_baseline"]["slot"]) == 1 and "vs_previous" not in k1
    assert len(k2["mode_baseline"]["slot"]) == 2 and 0 < k2["mode_baseline"]["block"] <= 1
    assert 0 < k2["block_chance"] <= k2["chance_level_per_slot"][0]
    assert k2["vs_previous"]["stage"] == "k1" and len(k2["vs_previous"]["slot_agreement"]) == 2
    assert r["lossless"]["acceptance_length"] >= 1 and r["frontier_samples"] == 2
    (w,) = r["warnings"]  # k2 was trained at tau 1 only; the frontier's 1.5 lies outside
    assert "k2" in w and "frontier_taus[1]=1.5" in w
    md = (tmp_path / "report.md").read_text()
    for text in ("## Warnings", "mode baseline", "vs chained k/2 student", "| k2 | block |",
                 "entropy per sample", "| k2@p0 | 0.00 |", "| data | - |"):
        assert text in md, text


def test_report_of_min_p_students_measures_the_truncated_teacher(tmp_path):
    cfg = _tiny_run(tmp_path)
    cfg.eval.frontier_taus, cfg.eval.speed_batches = [], []
    exact = evaluate_run(cfg, tmp_path)
    for k in ("k1", "k2"):
        path = tmp_path / k / "export" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "teacher_min_p": 0.2}))
    r = evaluate_run(cfg, tmp_path)
    assert r["decode"]["teacher_min_p"] == 0.2 and r["lossless"]["teacher_min_p"] == 0.2
    assert list(r["samples"])[:3] == ["teacher", "teacher@exact", "data"]
    assert r["samples"]["teacher@exact"]["nll"] == exact["samples"]["teacher"]["nll"]  # the same samples
    # the truncated teacher's samples are likelier under the teacher, its distributions sharper
    assert r["samples"]["teacher"]["nll"] < exact["samples"]["teacher"]["nll"]
    for k in ("k1", "k2"):
        assert r["stages"][k]["mode_baseline"]["slot"][0] > exact["stages"][k]["mode_baseline"]["slot"][0]
        assert r["stages"][k]["chance_level_per_slot"][0] > exact["stages"][k]["chance_level_per_slot"][0]
    assert r["lossless"]["exact"]  # lossless reproduces the truncated teacher's sample
    assert "min-p 0.2 truncated" in (tmp_path / "report.md").read_text()
    path = tmp_path / "k1" / "export" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "teacher_min_p": 0.0}))
    with pytest.raises(DecodeError, match="different teacher truncations"):
        evaluate_run(cfg, tmp_path)


def test_agreement_only_report(tmp_path):
    """No frontier, lossless or speed measurement: the report still renders (the budget curve's use)."""
    cfg = _tiny_run(tmp_path)
    cfg.eval.frontier_taus, cfg.eval.lossless, cfg.eval.speed_batches = [], False, []
    r = evaluate_run(cfg, tmp_path)
    assert {"frontier", "lossless", "speed"}.isdisjoint(r) and r["stages"]["k2"]["block_agreement"] >= 0
    assert "## Decode speed" not in (tmp_path / "report.md").read_text()


def test_report_reads_the_teacher_named_by_distill_teacher(tmp_path):
    """A run whose stages distilled a teacher trained elsewhere (distill.teacher: its run folder)
    is evaluated against that teacher, with that run's validation perplexity."""
    cfg = _tiny_run(tmp_path / "run")
    cfg.eval.frontier_taus, cfg.eval.lossless, cfg.eval.speed_batches = [], False, []
    elsewhere = tmp_path / "pretrained" / "teacher"
    elsewhere.parent.mkdir()
    (tmp_path / "run" / "teacher").rename(elsewhere)
    (elsewhere / "teacher_summary.json").write_text(json.dumps({"val_ppl": 12.5, "val_loss": 2.5}))
    with pytest.raises(DecodeError, match="set distill.teacher"):
        evaluate_run(cfg, tmp_path / "run")
    cfg.distill.teacher = str(elsewhere)
    r = evaluate_run(cfg, tmp_path / "run")
    assert r["teacher"]["val_ppl"] == 12.5 and set(r["stages"]) == {"k1", "k2"}
    cfg.distill.teacher = str(elsewhere / "export")  # the export folder itself
    assert evaluate_run(cfg, tmp_path / "run")["teacher"]["val_ppl"] == 12.5
