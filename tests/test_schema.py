"""The typed schema (engine/schema.py): every config key has a type, its closed sets of words are the code's own,
and what it refuses is one line naming the key, the value and what the key takes."""

import pytest
from cli_helpers import compose_config
from omegaconf import OmegaConf

from engine.schema import DATASET_NAMES, PROTECT_MODES, Amp, check_value, schema_field, takes


def test_every_config_key_has_a_type_in_the_schema():
    cfg = compose_config("dataset=synthetic")
    plain = OmegaConf.to_container(cfg, resolve=False)
    keys = [f"{group}.{name}" for group, node in plain.items() if isinstance(node, dict) for name in node]
    keys += [name for name, node in plain.items() if not isinstance(node, dict)]
    assert len(keys) > 80 and all(schema_field(key) is not None for key in keys), [
        key for key in keys if schema_field(key) is None
    ]
    assert all(schema_field(key).metadata["help"] for key in keys)


def test_the_schemas_words_are_the_codes_own():
    import regtome
    from data.datasets import DATASETS
    from engine.run.runtime import AMP_DTYPES

    assert set(PROTECT_MODES) == set(regtome.PROTECT_MODES)  # (the tasks are read from engine.task_table)
    assert {member.name for member in Amp} == {"auto", *AMP_DTYPES}
    assert set(DATASET_NAMES) == set(DATASETS)


@pytest.mark.parametrize(
    "key, value, line",
    [
        ("trainer.lr", "abc", "trainer.lr=abc: takes a number"),
        ("trainer.epochs", 2.5, "trainer.epochs=2.5: takes an int"),
        ("tome.prop_attn", "maybe", "tome.prop_attn=maybe: takes true or false"),
        ("runtime.device", "gpu", "runtime.device=gpu: takes one of auto, cuda, cpu"),
        ("export.format", "tflite", "export.format=tflite: takes one of onnx, torch_export"),
        ("dataset.mean", [0.5, "a"], "dataset.mean=[0.5,a]: takes a list of numbers or null"),
        ("export.batch", 0, "export.batch=0: takes dynamic or an int >= 1"),
        ("runtime.num_workers", -1, "runtime.num_workers=-1: takes an int >= 0"),
        ("benchmark.batch_sizes", [1, [2]], "benchmark.batch_sizes=[1,[2]]: takes ints >= 1"),  # was a TypeError
    ],
)
def test_a_value_a_key_cannot_take_is_one_line(key, value, line):
    assert check_value(key, value) == line


@pytest.mark.parametrize(
    "key, value",
    [
        ("trainer.lr", 0.1),
        ("tome.r", [16, -1.0]),
        ("runtime.compile", "max-autotune"),
        ("model.kwargs.depth", 3),
    ],
)
def test_values_a_key_takes_pass(key, value):
    assert check_value(key, value) is None


def test_takes_words_a_keys_type():
    assert takes("model.registers") == "takes an int or null" and takes("tome.protect").endswith("apart, prefix, class")


def test_the_option_reference_in_docs_cli_md_is_what_the_script_writes_from_the_schema():
    import subprocess
    import sys

    from cli_helpers import ROOT

    check = [sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"]
    result = subprocess.run(check, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_interpolation_on_the_command_line_is_judged_by_what_it_resolves_to(tmp_path):
    from cli_helpers import run_main

    shown = run_main("--cfg", "job", "runtime.eval_batch_size=${trainer.batch_size}", cwd=tmp_path)
    assert "eval_batch_size: ${trainer.batch_size}" in shown.stdout
    assert check_value("trainer.lr", "${trainer.min_lr}") is None  # validate() judges the resolved value


@pytest.mark.parametrize(
    "swept,message",
    [
        (  # a job of another config group: the second data set does not read dataset.noise
            ["dataset=synthetic,cifar10", "dataset.noise=0.3"],
            "error: dataset.noise is read by dataset=synthetic only (this is dataset=cifar10): drop it",
        ),
        (["dataset=synthetic", "tome.r=4,null"], "error: tome.r is null"),  # a swept key of the last job
    ],
)
def test_every_job_of_a_sweep_is_validated_before_the_first_starts(tmp_path, swept, message):
    """Rules between keys hold for every job, checked before any job runs: nothing is created."""
    from cli_helpers import SMOKE, run_main

    smoke = [o for o in SMOKE if not o.startswith(("dataset=", "tome.r="))]
    result = run_main("-m", "task=train", *smoke, *swept, "trainer.epochs=1", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_glob_sweep_of_config_groups_is_read_and_every_group_it_names_is_checked():
    """glob() lists a group's options (Hydra's loader): each job of `model=glob(...)` is checked before any runs,
    here the second model, which has no model.architecture to set."""
    from cli_helpers import ROOT

    from engine.cli.claim import register_resolvers
    from engine.cli.command_line import check_command_line
    from engine.errors import UserError

    register_resolvers()
    configs = ROOT / "configs"
    assert check_command_line(["-m", "tome=glob(*)", "dataset=glob(cifar*)", "task=eval"], configs).multirun
    with pytest.raises(UserError, match=r"^model.architecture.hidden_size is not a key: model.architecture is null"):
        check_command_line(["-m", "model=hf_vit_base,vit_small_reg4", "model.architecture.hidden_size=8"], configs)
