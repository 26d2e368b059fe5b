"""One step of the recipe: the AR teacher (k = 0) or distillation stage k of a run.

A run folder (``output_dir``) holds ``data/``, ``teacher/``, ``k1/``, ``k2/``, ... (each a
training run folder whose finished model is exported to ``export/``). A :class:`Stage` knows,
from the run's config alone, its run and export folders, where it reads the AR teacher from
(``distill.teacher`` or ``<run>/teacher/export``) and the student it starts from (the previous
stage's export or ``distill.init_from_student``), the config it trains with, and which model it
builds. The commands (``app/``), the memory plan, resharding and the run report all ask it, so
these answers are made in one place.

Imports only config, decode (to read decoder folders) and model (lazily, to build): the memory
plan in ``parallel/`` uses it too, so it must not reach the training side.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from .config import Config, ConfigError, shards_dir_of
from .config.schema import ModelConfig
from .errors import CheckpointError

TEACHER = 0  # the k of the AR teacher's stage


def stage_name(k: int) -> str:
    """The folder (and --stage) name of stage ``k``: teacher, k1, k2, ..."""
    return "teacher" if k == TEACHER else f"k{k}"


def parse_stage(text: str, stages: list[int] | None = None, *, teacher: bool = False) -> int:
    """``--stage k2`` (or ``2``) -> 2; ``teacher`` -> 0 when ``teacher`` is allowed. With ``stages``
    (distill.stages) the stage must be one of them. ConfigError naming the choices otherwise."""
    t = text.lower()
    if teacher and t == stage_name(TEACHER):
        return TEACHER
    digits = t[1:] if t.startswith("k") else t
    if digits.isdigit() and int(digits) >= 1 and (stages is None or int(digits) in stages):
        return int(digits)
    choices = ", ".join(f"k{k}" for k in stages) + " (distill.stages)" if stages else "k1, k2, k4 or k8"
    raise ConfigError([f"--stage {text!r}: use {'teacher or ' if teacher else ''}{choices}"], "command line")


def require_export(path: Path, what: str, fix: str, kind: str) -> dict:
    """The decoder config of the export ``path`` that must hold a ``kind`` ("ar"/"pflm") model;
    CheckpointError naming ``what`` and the ``fix`` when it is missing or holds another kind."""
    from .decode.format import read_decoder_config

    if not (path / "config.json").exists():
        raise CheckpointError(f"{what} not found at {path} (no config.json); {fix}")
    conf = read_decoder_config(path)
    if conf.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {conf.get('kind')!r} model but {what} must be {kind!r}; {fix}")
    return conf


@dataclasses.dataclass(frozen=True)
class StageInputs:
    """What distillation stage k reads, resolved from the run's folders and the config."""

    teacher: Path               # the AR teacher's export (loaded when the stage needs it)
    teacher_conf: dict | None   # its decoder config, when the stage needs it
    previous: Path | None       # the stage-k/2 student's export (stage k > 1)
    previous_conf: dict | None
    targets_from: Path          # the frozen model whose outputs are the targets
    init_from: Path             # the weights the student starts from (stage 1: the teacher's)
    arch: dict                  # the architecture (model.*) every model of the stage shares
    noise: dict                 # the student's noise convention (Stage.noise)
    masked_token_ids: list      # tokens masked in every model of the stage (and in its export)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Stage ``k`` (0: the AR teacher) of the run whose config is ``cfg`` (``output_dir``: the run folder)."""

    cfg: Config
    k: int

    @property
    def name(self) -> str:
        return stage_name(self.k)

    @property
    def is_teacher(self) -> bool:
        return self.k == TEACHER

    @property
    def root(self) -> Path:
        """The run folder holding every stage."""
        return Path(self.cfg.output_dir)

    @property
    def run_dir(self) -> Path:
        return self.root / self.name

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"

    @property
    def export_kind(self) -> str:
        """The decoder kind this stage exports: "ar" (the teacher) or "pflm"."""
        return "ar" if self.is_teacher else "pflm"

    @property
    def teacher_chain(self) -> bool:
        """Stage 2k takes its targets from the AR teacher (distill.higher_stage_targets=teacher_chain)."""
        return self.k > 1 and self.cfg.distill.higher_stage_targets == "teacher_chain"

    @property
    def needs_ar_teacher(self) -> bool:
        """The stage holds the frozen AR teacher: stage 1, the teacher chain, or the noise inversion loss."""
        return self.k >= 1 and (self.k == 1 or self.teacher_chain or self.cfg.distill.noise_inversion_weight > 0)

    @property
    def needs_previous_student(self) -> bool:
        """The stage holds the frozen stage-k/2 student (its self-forcing targets)."""
        return self.k > 1 and not self.teacher_chain

    @property
    def teacher_export(self) -> Path:
        """The AR teacher's decoder folder: distill.teacher (a run folder or export) or <run>/teacher/export."""
        if self.cfg.distill.teacher:
            p = Path(self.cfg.distill.teacher)
            return p / "export" if (p / "export" / "config.json").exists() else p
        return Stage(self.cfg, TEACHER).export_dir

    @property
    def teacher_summary(self) -> Path:
        """The teacher run's teacher_summary.json (beside its export; absent for an imported teacher)."""
        return self.teacher_export.parent / "teacher_summary.json"

    def require_teacher(self) -> dict:
        """The AR teacher export's decoder config (CheckpointError naming the fix when missing)."""
        return require_export(self.teacher_export, "the AR teacher export", "train it first (`kforcing-dist "
                              f"train-teacher -o {self.root / 'teacher'}`) or set distill.teacher", "ar")

    def previous(self) -> tuple[Path, dict]:
        """The stage-k/2 student that stage k (> 1) starts from and its decoder config:
        distill.init_from_student when set, else <run>/k{k/2}/export."""
        d, k = self.cfg.distill, self.k
        if d.init_from_student:
            path = Path(d.init_from_student)
            conf = require_export(path, "distill.init_from_student", "give a PFLM decoder folder (a stage's "
                                  "export/ or one written by `kforcing-dist convert from-kforcing`)", "pflm")
            what, fix = "distill.init_from_student", f"run the stage it continues: --stage k{2 * conf['max_k']}"
        else:
            path = Stage(self.cfg, k // 2).export_dir
            conf = require_export(path, f"the stage-k{k // 2} export", f"run `kforcing-dist distill --stage "
                                  f"k{k // 2}` first, or set distill.init_from_student to a PFLM decoder folder",
                                  "pflm")
            what, fix = f"the stage-k{k // 2} export", f"re-run stage k{k // 2} or set distill.init_from_student"
        if conf["max_k"] != k // 2:
            raise CheckpointError(f"{what} {path} holds a k={conf['max_k']} student (max_k {conf['max_k']}), but "
                                  f"stage k{k} starts from a k={k // 2} one; {fix}")
        return path, conf

    def inputs(self) -> StageInputs:
        """The exports distillation stage k reads and what they fix for it, checked (ConfigError /
        CheckpointError naming the fix)."""
        d, k = self.cfg.distill, self.k
        if k not in d.stages:
            raise ConfigError([f"stage k{k} is not in distill.stages={d.stages}"], "command line")
        ar_path = self.teacher_export
        ar_conf = self.require_teacher() if self.needs_ar_teacher else None
        if k == 1 and d.init_from_student:
            raise ConfigError([f"distill.init_from_student={d.init_from_student}: stage k1 starts from the AR "
                               f"teacher; the folder starts the stage k = 2 x its max_k (run that --stage)"],
                              "the config")
        prev_path, prev_conf = self.previous() if k > 1 else (None, None)
        noise = self.noise(prev_conf)
        if prev_conf is not None and prev_conf.get("teacher_min_p", 0.0) != d.teacher_min_p:
            raise ConfigError([f"distill.teacher_min_p={d.teacher_min_p} but the student it starts from ({prev_path}) "
                               f"was distilled against teacher_min_p={prev_conf.get('teacher_min_p', 0.0)}: every "
                               f"stage learns the same G; set distill.teacher_min_p to that value"], "the config")
        # teacher_chain: stage 2k's targets come from the AR teacher, the frozen stage k is not needed
        return StageInputs(
            ar_path, ar_conf, prev_path, prev_conf,
            targets_from=ar_path if k == 1 or self.teacher_chain else prev_path,
            init_from=ar_path if k == 1 else prev_path,
            arch=(ar_conf or prev_conf)["model"], noise=noise,
            # a released model's mask token stays masked in every model of the stage (and in its export)
            masked_token_ids=(prev_conf or ar_conf)["masked_token_ids"])

    def noise(self, prev_conf: dict | None) -> dict:
        """The noise-feature convention of the stage's student ({"features", "max_freq"}): the config's
        for stage 1, the previous student's for a later stage (ConfigError when the config explicitly
        asks for another: the weights were trained under that one)."""
        from .config.loader import is_given
        from .nn.noise import noise_section

        cfg, d = self.cfg, self.cfg.distill
        if prev_conf is None:
            return noise_section(d.noise_features, d.noise_max_freq)
        prev = prev_conf["noise"]
        clash = []
        if is_given(cfg, "distill.noise_features") and d.noise_features != prev["features"]:
            clash.append(f"distill.noise_features={d.noise_features!r} but the student it starts from uses "
                         f"{prev['features']!r}")
        if prev["features"] == "rising" and is_given(cfg, "distill.noise_max_freq") \
                and float(d.noise_max_freq) != prev["max_freq"]:
            clash.append(f"distill.noise_max_freq={d.noise_max_freq} but the student it starts from uses "
                         f"{prev['max_freq']}")
        if clash:
            raise ConfigError([f"{c}: a later stage keeps its previous student's noise features; remove the key "
                               f"(or set it to the student's value)" for c in clash], "the config")
        return dict(prev)

    def config(self, model_cfg: dict | None = None, noise: dict | None = None) -> Config:
        """The config the stage trains with: its run folder and the run's token shards; for a
        distillation stage the distill.* schedule, the architecture ``model_cfg`` (the teacher's,
        from its export; None keeps model.*, as the memory plan does) and the noise convention
        ``noise`` it really trains with (recorded in its checkpoints)."""
        cfg, d = self.cfg, self.cfg.distill
        out = copy.deepcopy(cfg)
        out.output_dir = str(self.run_dir)
        if self.is_teacher or not out.data.shards_dir:
            out.data.shards_dir = str(shards_dir_of(cfg))
        if self.is_teacher:
            return out
        if model_cfg is not None:
            out.model = ModelConfig(**model_cfg)
        out.train = dataclasses.replace(
            cfg.train, max_steps=d.stage_steps[d.stages.index(self.k)] if d.stage_steps else d.max_steps,
            lr=d.lr, min_lr=d.min_lr, warmup_steps=d.warmup_steps,
            micro_batch_size=d.micro_batch_size or cfg.train.micro_batch_size,
            seq_len=d.seq_len or cfg.train.seq_len, eval_interval=d.eval_interval,
            global_batch_size=0 if d.micro_batch_size else cfg.train.global_batch_size)
        if noise is not None:
            out.distill.noise_features = noise["features"]
            if noise["max_freq"] is not None:
                out.distill.noise_max_freq = noise["max_freq"]
        return out

    def export_fields(self, noise: dict | None = None, masked_token_ids=()) -> dict:
        """What the stage's decoder folder records besides the weights (``export_decoder``'s
        keywords): "ar" and its masked tokens for the teacher; a stage's max_k, noise convention, masked tokens, the
        tau range it trained on, its CDF order and the teacher truncation it distilled."""
        if self.is_teacher:
            return {"kind": "ar", "masked_token_ids": list(masked_token_ids)}
        d = self.cfg.distill
        return {"kind": "pflm", "max_k": self.k, "noise": noise, "masked_token_ids": masked_token_ids,
                "tau_range": (d.tau_min, d.tau_max), "cdf_order": d.cdf_order,
                "teacher_min_p": d.teacher_min_p}

    def build_model(self, model_cfg: ModelConfig, padded_vocab_size: int, groups, pp: int, *,
                    noise: dict | None = None, masked_token_ids=()):
        """This stage's model at the layout: a TransformerLM (the teacher) or a PFLM with max_k = k
        and the noise convention ``noise``, as a pipeline module when ``pp`` > 1."""
        from .model.pipeline import build_model

        return build_model(model_cfg, padded_vocab_size, groups, pp, max_k=self.k, noise=noise,
                           masked_token_ids=masked_token_ids)
