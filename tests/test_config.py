"""Config errors name the key and what is allowed; overrides parse; every shipped preset loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import CONFIG_DIR, load_config, parse_overrides
from lmforge.errors import ConfigError
from lmforge.recipes.pretrain import PretrainConfig, resolve_config


def test_overrides_parse_types_and_nesting() -> None:
    got = parse_overrides(
        ["--optim.lr=1e-3", "--train.max_steps", "10", "--resume", "--data.path='007'"]
    )
    assert got == {
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 10},
        "resume": True,
        "data": {"path": "007"},
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
    with pytest.raises(ConfigError, match=r"sched\.warmup_steps .* train\.max_steps"):
        load_config(
            PretrainConfig, overrides={"train": {"max_steps": 10}, "sched": {"warmup_steps": 50}}
        )
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
    assert resolve_config(None, {}) == resolve_config("cpu_demo", {})
    assert resolve_config(None, {}).model.arch == "llama"


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
    cfg = load_config(FinetuneConfig, overrides=parse_overrides(["--train.num_threads=1"]))
    assert cfg.train.num_threads == 1
    assert cfg.train.model_dump() == default.train.model_dump() | {"num_threads": 1}
    assert default.train.eval_every != TrainConfig().eval_every  # the test can fail
    assert cfg.optim.weight_decay == default.optim.weight_decay
    path = tmp_path / "ft.yaml"
    path.write_text("optim:\n  lr: 0.01\n")
    cfg = load_config(FinetuneConfig, config_file=str(path))
    assert cfg.optim.lr == 0.01 and cfg.optim.weight_decay == default.optim.weight_decay == 0.0
