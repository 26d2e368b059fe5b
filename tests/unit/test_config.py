"""Config loading and validation: every user error is reported clearly, all at once."""

from pathlib import Path

import pytest

from kforcing_dist.config import ConfigError, check, derive_layout, load_config, validate
from kforcing_dist.config.reference import reference_markdown, updated_page

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_at_any_level_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "model:\n  hiden_size: 3\nbogus: 1\n"))
    msg = str(e.value)
    assert "model.hiden_size: unknown key" in msg and "hidden_size" in msg and "num_layers" in msg
    assert "bogus: unknown key" in msg and "parallel" in msg
    assert len(e.value.problems) == 2


def test_wrong_types_and_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  lr: fast\n  max_steps: 1.5\nmodel:\n  norm: batchnorm\n"
                                    "logging:\n  tensorboard: 'yes'\n"))
    msg = str(e.value)
    assert "train.lr: expected float, got str 'fast'" in msg
    assert "train.max_steps: expected int" in msg
    assert "model.norm: 'batchnorm' is not one of 'layernorm', 'rmsnorm'" in msg
    assert "logging.tensorboard: expected bool" in msg


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(write(tmp_path, "model: 3\n"))


def test_overrides_are_typed_and_strict(tmp_path):
    cfg, text = load_config(write(tmp_path, "train:\n  lr: 1.0e-3\n"),
                            ["train.lr=3e-4", "parallel.tp=2", "data.paths=[a.txt, b.jsonl]"], "out/x")
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.parallel.tp == 2
    assert cfg.data.paths == ["a.txt", "b.jsonl"] and cfg.output_dir == "out/x"
    assert "1.0e-3" in text  # the original YAML is kept verbatim
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["train.lr"])


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"config file {path} is empty.*configs/demo\.yaml"):
        load_config(path)
    # an explicit empty mapping means "all defaults" on purpose; no file at all is the defaults too
    assert load_config(write(tmp_path, "{}\n"))[0].model.hidden_size == load_config(None)[0].model.hidden_size


def test_parallel_layout_problems_reported_together():
    cfg, _ = load_config(None, ["parallel.tp=3", "parallel.pp=2", "parallel.zero_stage=3",
                                "model.num_layers=3"])
    problems = validate(cfg, world_size=4)
    text = "\n".join(problems)
    assert "tp x pp x dp must equal the world size 4" in text
    assert "num_heads=4 is not divisible by parallel.tp=3" in text
    assert "num_layers=3 is not divisible by parallel.pp=2" in text
    assert "zero_stage=3 with parallel.pp=2" in text
    assert len(problems) >= 4


def test_valid_tp_dp_layout_and_batch_arithmetic():
    cfg, _ = load_config(None, ["parallel.tp=2", "train.micro_batch_size=4", "train.global_batch_size=32"])
    check(cfg, world_size=4)
    layout = derive_layout(cfg, 4)
    assert (layout.tp, layout.dp, layout.grad_accum, layout.global_batch_size) == (2, 2, 4, 32)
    bad, _ = load_config(None, ["parallel.tp=2", "train.micro_batch_size=4", "train.global_batch_size=12"])
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x dp = 4 x 2 = 8"):
        check(bad, world_size=4)


def test_model_and_file_problems(tmp_path):
    cfg, _ = load_config(None, ["model.hidden_size=30", "train.seq_len=1000", "data.source=files",
                                f"data.paths=[{tmp_path / 'missing.txt'}, x.csv]",
                                f"tokenizer.path={tmp_path / 'no.model'}"])
    text = "\n".join(validate(cfg))
    assert "hidden_size=30 is not divisible by model.num_heads=4" in text
    assert "train.seq_len=1000 must be between 2 and model.max_seq_len=256" in text
    assert "missing.txt does not exist" in text
    assert "x.csv has an unsupported extension" in text
    assert "no.model does not exist" in text


def test_hf_source_needs_exactly_one_of_name_and_path(tmp_path):
    cfg, _ = load_config(None, ["data.source=hf", f"data.hf_path={tmp_path}"])
    assert validate(cfg) == []
    cfg, _ = load_config(None, ["data.source=hf"])
    assert any("needs data.hf_name" in p and "data.hf_path" in p for p in validate(cfg))
    cfg, _ = load_config(None, ["data.source=hf", "data.hf_name=lm1b", f"data.hf_path={tmp_path / 'x'}"])
    text = "\n".join(validate(cfg))
    assert "both set" in text and "x is not a folder" in text


def test_eval_sample_lengths_must_fit_the_model():
    cfg, _ = load_config(None, ["model.max_seq_len=64", "eval.prompt_len=10", "eval.sample_len=60"])
    assert any("prompt_len 10 + sample_len 60 exceeds model.max_seq_len=64" in p for p in validate(cfg))
    cfg, _ = load_config(None, ["eval.sample_len=-1", "eval.prompt_len=0"])
    text = "\n".join(validate(cfg))
    assert "eval.sample_len and eval.frontier_samples must be >= 0" in text
    assert "every count and length must be >= 1" in text
    cfg, _ = load_config(None, ["model.max_seq_len=64", "eval.prompt_len=6", "eval.sample_len=0"])
    assert not [p for p in validate(cfg) if p.startswith("eval")]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg, _ = load_config(path)
    check(cfg, world_size=cfg.parallel.tp * cfg.parallel.pp)


def test_config_reference_page_is_current():
    page = (ROOT / "docs" / "config.md").read_text()
    assert updated_page(page) == page, "docs/config.md is stale: run `make config-docs`"
    assert "`train.lr`" in reference_markdown()


def test_pipeline_layouts_accepted_and_unsafe_combinations_refused():
    cfg, _ = load_config(None, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"])
    check(cfg, world_size=8)  # tp 2 x pp 2 x dp 2 under ZeRO-1
    cfg, _ = load_config(None, ["parallel.pp=2", "parallel.zero_stage=0", "train.grad_clip=1.0",
                                "model.tie_embeddings=true", "distill.noise_inversion_weight=0.5"])
    text = "\n".join(validate(cfg, world_size=2))
    assert "zero_stage=0 with parallel.pp=2" in text and "use zero_stage 1" in text
    assert "model.tie_embeddings with parallel.pp=2" in text
    assert "noise_inversion_weight=0.5 with parallel.pp=2" in text
    cfg, _ = load_config(None, ["parallel.pp=2", "parallel.zero_stage=0", "train.grad_clip=0"])
    check(cfg, world_size=2)  # without clipping ZeRO-0 is exact


def test_frequency_penalty_is_a_number_a_map_or_null(tmp_path):
    from kforcing_dist.config import config_to_yaml
    from kforcing_dist.decode.penalty import AUTHORS_PER_K, penalty_for_k

    cfg, _ = load_config(None)
    assert cfg.decode.frequency_penalty is None  # the authors' values
    assert [penalty_for_k(cfg.decode.frequency_penalty, k) for k in (2, 3, 4)] == \
        [AUTHORS_PER_K[k] for k in (2, 3, 4)]
    cfg, _ = load_config(write(tmp_path, "decode:\n  frequency_penalty: {2: 0.3, 4: 1}\n"))
    assert cfg.decode.frequency_penalty == {2: 0.3, 4: 1.0} and validate(cfg, check_files=False) == []
    # the typed config round-trips through YAML (checkpoints store it)
    again, _ = load_config(write(tmp_path, config_to_yaml(cfg)))
    assert again.decode.frequency_penalty == {2: 0.3, 4: 1.0}
    for override, want in (("0", 0.0), ("0.7", 0.7), ("{2: 0.2, 4: 0.4}", {2: 0.2, 4: 0.4}),
                           ('{"2": 2e-1}', {2: 0.2}), ("null", None)):
        cfg, _ = load_config(None, [f"decode.frequency_penalty={override}"])
        assert cfg.decode.frequency_penalty == want, override
        assert validate(cfg, check_files=False) == []


@pytest.mark.parametrize("value, match", [
    ("{0: 0.3, 4: 0.5}", r"decode.frequency_penalty: bad entries \{0: 0.3\}"),
    ("{2: -0.1}", r"bad entries \{2: -0.1\}"),
    ("{2: .nan}", r"bad entries \{2: nan\}"),
    ("-1", r"decode.frequency_penalty=-1.0: give a finite number >= 0"),
    (".inf", r"decode.frequency_penalty=inf"),
    ("{k2: 0.3}", r"decode.frequency_penalty: keys must be int, got 'k2'"),
    ("{2: lots}", r"decode.frequency_penalty\[2\]: expected float, got str 'lots'"),
    ("[0.3, 0.5]", r"expected float, dict\[int, float\] or None, got list"),
    ("true", r"expected float, dict\[int, float\] or None, got bool"),
])
def test_frequency_penalty_errors_are_one_clear_line(value, match):
    with pytest.raises(ConfigError, match=match) as e:
        check(load_config(None, [f"decode.frequency_penalty={value}"])[0], check_files=False)
    assert len(e.value.problems) == 1


def test_frequency_penalty_doc_states_the_authors_values():
    from kforcing_dist.decode.penalty import AUTHORS_DEFAULT, AUTHORS_PER_K

    ks = sorted(AUTHORS_PER_K)
    said = (" / ".join(f"{AUTHORS_PER_K[k]:g}" for k in ks) + " for k = "
            + " / ".join(map(str, ks)) + f" and {AUTHORS_DEFAULT:g} for other k")
    assert said in reference_markdown()


def test_higher_stage_targets_choices_and_pipeline_refusal():
    assert load_config(None, [])[0].distill.higher_stage_targets == "self_forcing"
    cfg, _ = load_config(None, ["distill.higher_stage_targets=teacher_chain"])
    check(cfg, world_size=1)
    with pytest.raises(ConfigError, match="teacher_chain"):
        load_config(None, ["distill.higher_stage_targets=chain"])
    cfg.distill.higher_stage_targets = "chain"  # set in code, past the loader
    assert any("higher_stage_targets='chain'" in p for p in validate(cfg, world_size=1))
    cfg, _ = load_config(None, ["parallel.pp=2", "parallel.zero_stage=1",
                                "distill.higher_stage_targets=teacher_chain"])
    text = "\n".join(validate(cfg, world_size=2))
    assert "teacher_chain with parallel.pp=2" in text and "use self_forcing or parallel.pp: 1" in text
    cfg.distill.stages = [1]  # no stage past the first: nothing to refuse
    check(cfg, world_size=2)


def test_teacher_min_p_range_and_noise_inversion_refusal():
    cfg, _ = load_config(None, ["distill.teacher_min_p=0.1", "decode.min_p=0.1"])
    check(cfg, world_size=1)
    for value in ("1.0", "-0.1"):
        cfg, _ = load_config(None, [f"distill.teacher_min_p={value}", f"decode.min_p={value}"])
        text = "\n".join(validate(cfg, world_size=1))
        assert f"distill.teacher_min_p={float(value)}: need 0 <= teacher_min_p < 1" in text
        assert f"decode.min_p={float(value)}: need 0 <= min_p < 1" in text
    cfg, _ = load_config(None, ["distill.teacher_min_p=0.1", "distill.noise_inversion_weight=0.5"])
    assert any("a data token in the cut tail" in p for p in validate(cfg, world_size=1))


def test_noise_draws_per_start_must_be_positive():
    cfg, _ = load_config(None, ["distill.noise_draws_per_start=2"])
    check(cfg, world_size=1)
    cfg, _ = load_config(None, ["distill.noise_draws_per_start=0"])
    assert any("distill.noise_draws_per_start=0 must be >= 1" in p for p in validate(cfg, world_size=1))


def test_training_without_context_gradients_needs_no_pipeline():
    cfg, _ = load_config(None, ["distill.context_gradients=false"])
    check(cfg, world_size=1)
    cfg, _ = load_config(None, ["distill.context_gradients=false", "parallel.pp=2"])
    assert any("distill.context_gradients=false needs parallel.pp = 1" in p for p in validate(cfg, world_size=2))


@pytest.mark.parametrize("name", ["norm", "activation", "position", "attention_backend"])
def test_model_validators_read_their_choices_from_the_schema(name, monkeypatch):
    # Narrow one field's choices in the schema to its first value: every model-config validator
    # must follow (the second value becomes invalid), which holds only if none keeps its own list.
    import dataclasses
    import types

    from kforcing_dist.config.schema import MODEL_CHOICE_FIELDS, ModelConfig
    from kforcing_dist.decode.errors import DecodeError
    from kforcing_dist.decode.format import FORMAT_VERSION, validate_decoder_config
    from kforcing_dist.model.transformer import validate_model_config

    assert name in MODEL_CHOICE_FIELDS
    field = ModelConfig.__dataclass_fields__[name]
    first, second = field.metadata["choices"][:2]
    monkeypatch.setattr(field, "metadata", types.MappingProxyType({**field.metadata, "choices": (first,)}))
    # learned positions need no even head dim; swiglu/rmsnorm/math need nothing else
    cfg = ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=48, **{name: second})
    with pytest.raises(ValueError, match=f"model.{name} must be one of {first}, got '{second}'"):
        validate_model_config(cfg, padded_vocab_size=128, tp=1)
    conf = {"format": FORMAT_VERSION, "kind": "ar", "model": dataclasses.asdict(cfg), "padded_vocab_size": 128}
    with pytest.raises(DecodeError, match=f"model.{name} must be one of"):
        validate_decoder_config(conf)
    # and the first value still passes both
    ok = dataclasses.replace(cfg, **{name: first})
    validate_model_config(ok, padded_vocab_size=128, tp=1)
    validate_decoder_config({**conf, "model": dataclasses.asdict(ok)})
