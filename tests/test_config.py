"""Config errors name the key and what is allowed; overrides parse; every shipped preset loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import resolve_config
from lmforge.config import CONFIG_DIR, load_config, parse_overrides
from lmforge.errors import ConfigError
from lmforge.recipes.estimate import EstimateConfig
from lmforge.recipes.generate import GenerateConfig
from lmforge.recipes.pretrain import PretrainConfig

PT, GEN = PretrainConfig, GenerateConfig
CK = {"checkpoint": "ck"}  # generate's one required key


def test_overrides_parse_types_and_nesting() -> None:
    got = parse_overrides(
        ["--optim.lr=1e-3", "--train.max_steps", "10", "--resume", "--data.path=007"],
        PretrainConfig,
    )
    assert got == {
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 10},
        "resume": True,
        "data": {"path": "007"},  # a text field keeps the text: no quotes needed
    }


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, overrides={"train": {"max_step": 5}})
    msg = str(e.value)
    assert "train.max_step: unknown key; did you mean 'max_steps'?" in msg
    assert "allowed keys:" in msg and "batch_size" in msg


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*integer.*'many'"):
        load_config(PretrainConfig, overrides={"train": {"batch_size": "many"}})


def test_bad_choice_lists_allowed_values() -> None:
    with pytest.raises(
        ConfigError, match=r"train\.precision: .*'fp32'.*'bf16-mixed'.*'fp16-mixed'.*'bf16'"
    ):
        load_config(PretrainConfig, overrides={"train": {"precision": "fp8"}})


def test_impossible_combination_is_rejected_before_work() -> None:
    # (a warm-up longer than the run used to be refused here: it is now shortened, see
    # test_a_run_shorter_than_the_presets_warmup_is_accepted)
    with pytest.raises(ConfigError, match="n_head"):
        load_config(PretrainConfig, overrides={"model": {"d_model": 100, "n_head": 3}})


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 10\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+"):
        load_config(PretrainConfig, config_file=str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lr: 1e-3\n  wd: 0.1\n")
    with pytest.raises(ConfigError, match=rf"(?s){typo}.*optim\.wd: unknown key"):
        load_config(PretrainConfig, config_file=str(typo))


def test_missing_config_file_lists_presets() -> None:
    with pytest.raises(ConfigError, match="cpu_demo"):
        load_config(PretrainConfig, config_file="no_such_preset", recipe="pretrain")


@pytest.mark.parametrize(
    "path", sorted(CONFIG_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_every_shipped_config_loads(path: Path) -> None:
    from lmforge.cli import COMMANDS

    recipe = path.parent.name
    command = next(
        c for name, c in COMMANDS.items() if name.split()[-1] == recipe or name == recipe
    )
    cfg = load_config(command.config(), config_file=str(path), recipe=recipe)
    assert cfg is not None


def test_cpu_demo_preset_is_the_no_argument_default() -> None:
    assert resolve_config("pretrain", None, {}) == resolve_config("pretrain", "cpu_demo", {})
    assert resolve_config("pretrain", None, {}).model.arch == "llama"


def test_pkg_paths_name_files_inside_installed_packages() -> None:
    from lmforge.config import package_path
    from lmforge.errors import ConfigError

    corpus = package_path("pkg:lmforge/data/corpora/gsm8k_test_250.jsonl")
    assert corpus.is_file() and corpus.parent.name == "corpora"
    assert str(package_path("plain/path.txt")) == "plain/path.txt"
    with pytest.raises(ConfigError, match="not installed"):
        package_path("pkg:no_such_package_xyz/file.gguf")
    with pytest.raises(ConfigError, match="has no file 'missing.gguf'"):
        package_path("pkg:lmforge/missing.gguf")


def test_one_override_keeps_the_recipes_other_section_defaults(tmp_path: Path) -> None:
    # finetune's train section differs from TrainConfig's (e.g. eval_every): changing one key
    # on the command line or in a YAML file must not reset the others to the generic defaults
    from lmforge.recipes.finetune import FinetuneConfig
    from lmforge.train.loop import TrainConfig

    default = FinetuneConfig()
    cfg = load_config(
        FinetuneConfig, overrides=parse_overrides(["--train.num_threads=1"], FinetuneConfig)
    )
    assert cfg.train.num_threads == 1
    assert cfg.train.model_dump() == default.train.model_dump() | {"num_threads": 1}
    assert default.train.eval_every != TrainConfig().eval_every  # the test can fail
    assert cfg.optim.weight_decay == default.optim.weight_decay
    path = tmp_path / "ft.yaml"
    path.write_text("optim:\n  lr: 0.01\n")
    cfg = load_config(FinetuneConfig, config_file=str(path))
    assert cfg.optim.lr == 0.01 and cfg.optim.weight_decay == default.optim.weight_decay == 0.0


# --- command-line values typed by their field (hardening issue) ---------------------------


@pytest.mark.parametrize(
    "prompt",
    ["ROMEO:", "yes", "123", "a: b", "- x", "[a, b]", "Hello #world", "  two\nlines ", "null", ""],
)
def test_a_text_field_receives_the_raw_text(prompt: str) -> None:
    # the README's own `--prompt "ROMEO:"` used to fail ('valid string'), '#world' was cut as a
    # YAML comment, newlines and leading spaces were lost
    cfg = resolve_config(
        "generate", None, parse_overrides(["--checkpoint", "ck", "--prompt", prompt], GEN)
    )
    assert cfg.prompt == prompt
    cfg = resolve_config("generate", None, parse_overrides([f"--prompt={prompt}"], GEN) | CK)
    assert cfg.prompt == prompt


def test_text_fields_inside_sections_and_optional_ones() -> None:
    got = parse_overrides(
        ["--data.path=on", "--out_dir=007", "--sample.prompt=true"], PretrainConfig
    )
    assert got == {"data": {"path": "on"}, "out_dir": "007", "sample": {"prompt": "true"}}
    # an optional text field: `null` unsets it (the one spelling that is not kept as text)
    assert parse_overrides(["--out_dir=null"], PretrainConfig) == {"out_dir": None}


def test_values_are_parsed_only_for_fields_of_those_types() -> None:
    got = parse_overrides(
        [
            "--train.max_steps=1e3",  # int: 1000
            "--optim.lr=3e-4",
            "--optim.betas=[0.8, 0.9]",  # tuple[float, float]
            "--sample.use_cache=off",  # bool
            "--sample.top_k=null",  # int | None
            "--model.norm=null",  # Literal | None
            "--dist.strategy=none",  # a choice spelled like null stays the choice
            "--resume=runs/x/checkpoints/step-000010",  # bool | str: a path
        ],
        PretrainConfig,
    )
    assert got == {
        "train": {"max_steps": 1000},
        "optim": {"lr": 3e-4, "betas": (0.8, 0.9)},
        "sample": {"use_cache": False, "top_k": None},
        "model": {"norm": None},
        "dist": {"strategy": "none"},
        "resume": "runs/x/checkpoints/step-000010",
    }
    assert parse_overrides(["--resume"], PretrainConfig) == {"resume": True}
    assert parse_overrides(["--resume=true"], PretrainConfig) == {"resume": True}
    est = parse_overrides(["--lora_targets=[q, v]", "--json", "--tokens=1e9"], EstimateConfig)
    assert est == {"lora_targets": ["q", "v"], "json": True, "tokens": 1e9}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.batch_size"], r"--train\.batch_size needs a value \(int\)"),
        (["--train.batch_size", "--train.max_steps=3"], r"--train\.batch_size needs a value"),
        (["--sample.temperature"], r"--sample\.temperature needs a value \(float\)"),
        (["--sample.prompt"], r"--sample\.prompt needs a value \(str\)"),
    ],
)
def test_a_flag_without_a_value_is_an_error_unless_boolean(args: list[str], message: str) -> None:
    # these used to become `true`, i.e. batch_size 1 and temperature 1.0, without a word
    with pytest.raises(ConfigError, match=message):
        parse_overrides(args, PretrainConfig)


def test_true_for_a_number_field_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*integer.*'true'"):
        resolve_config("pretrain", None, parse_overrides(["--train.batch_size=true"], PT))
    with pytest.raises(ConfigError, match=r"temperature: .*number.*'hot'"):
        resolve_config("generate", None, parse_overrides(["--temperature=hot"], GEN) | CK)


def test_unknown_keys_still_get_a_suggestion() -> None:
    overrides = parse_overrides(["--train.max_step", "5"], PretrainConfig)
    with pytest.raises(ConfigError, match="train.max_step: unknown key; did you mean 'max_steps'"):
        resolve_config("pretrain", None, overrides)


# --- config files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, first, key",
    [
        ("train:\n  max_steps: 5\noptim:\n  lr: 0.01\ntrain:\n  batch_size: 2\n", 5, 1, "train"),
        ("train:\n  max_steps: 5\n  batch_size: 2\n  max_steps: 7\n", 4, 2, "max_steps"),
    ],
)
def test_a_key_given_twice_in_a_file_is_refused_naming_both_lines(
    tmp_path: Path, text: str, line: int, first: int, key: str
) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve_config("pretrain", str(path), {})
    assert f"{path}:{line}: key '{key}' is given twice" in str(e.value)
    assert f"first at line {first}" in str(e.value)


def test_a_run_shorter_than_the_presets_warmup_is_accepted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from lmforge.train.lr_schedule import lr_at

    # the CPU demo warms up for 22 steps; `--train.max_steps=20` used to be refused
    with caplog.at_level("WARNING"):
        cfg = resolve_config("pretrain", None, parse_overrides(["--train.max_steps=20"], PT))
    assert cfg.sched.warmup_steps == 22 and cfg.train.max_steps == 20
    assert "warm-up is shortened to 2 steps" in caplog.text
    lrs = [lr_at(s, 1.0, 20, cfg.sched) for s in range(20)]
    assert lrs[:3] == [0.5, 1.0, 1.0]  # two warm-up steps reach the peak
    # the preset's warm-up-stable-decay: at the peak, then down over the last 30 % to the floor
    assert cfg.sched.name == "wsd" and lrs[2:14] == [1.0] * 12
    assert all(a > b for a, b in zip(lrs[14:], lrs[15:], strict=False))
    assert lrs[-1] < cfg.sched.min_lr_ratio + 0.2
    # a warm-up that fits is used as given, without a note
    caplog.clear()
    sched = cfg.sched.model_copy(update={"warmup_steps": 5})
    assert [lr_at(s, 1.0, 20, sched) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lr_at(0, 1.0, 1, cfg.sched) == 1.0  # a one-step run: no warm-up at all
