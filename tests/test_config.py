"""Typed TOML presets: defaults, overrides, one-line errors, resolved config round trip."""

from pathlib import Path

import pytest

from library.config import dump_config, load_config
from library.errors import UserError
from library.tables import GenerateConfig, SweepConfig, TrainConfig

PRESETS = sorted((Path(__file__).resolve().parent.parent / "presets").glob("*.toml"))


def write(tmp_path, text):
    path = tmp_path / "preset.toml"
    path.write_text(text)
    return path


def test_defaults_and_values(tmp_path):
    path = write(tmp_path, '[embedding]\nname = "fr3nchl4dy"\nnum_vectors = 2\n[train]\nlr = 0.002\n')
    config = load_config(TrainConfig, path)
    assert config.embedding.name == "fr3nchl4dy" and config.embedding.num_vectors == 2
    assert config.train.lr == 0.002 and config.train.batch_size == 1
    assert config.save.formats == ("pt", "safetensors")


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, "[train]\nlr = 0.002\n")
    config = load_config(
        TrainConfig,
        path,
        [
            "train.lr=0.05:10, 0.001",
            "train.max_steps=20",
            "model.checkpoint=/models/v1-5.safetensors",
            "save.formats=['pt']",
            "dataset.flip_aug=true",
        ],
    )
    assert config.train.lr == "0.05:10, 0.001"
    assert config.train.max_steps == 20
    assert config.model.checkpoint == "/models/v1-5.safetensors"
    assert config.save.formats == ("pt",)
    assert config.dataset.flip_aug is True


@pytest.mark.parametrize(
    "text, override, fragment",
    [
        ("[train]\nlrr = 0.1\n", None, "unknown key 'train.lrr'; did you mean 'lr'?"),
        ("[trian]\nlr = 0.1\n", None, "unknown key 'trian'; did you mean 'train'?"),
        (
            "[train]\nmax_steps = 'many'\n",
            None,
            "'train.max_steps' = 'many' has the wrong type; expected an integer",
        ),
        ("[train]\noptimizer = 'adam'\n", None, "did you mean 'adamw'?"),
        ("[dataset]\nflip_aug = 1\n", None, "must be true or false"),
        ("", "train.batchsize=4", "unknown key 'train.batchsize'; did you mean 'batch_size'?"),
        ("", "oops", "write it as table.key=value"),
    ],
)
def test_bad_keys_and_types_are_one_line_errors(tmp_path, text, override, fragment):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(TrainConfig, path, [override] if override else [])
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(TrainConfig, write(tmp_path, "[train\n"))


def test_resolved_config_round_trips(tmp_path):
    config = load_config(TrainConfig, None, ["embedding.name=x", "train.lr=0.05:10, 0.001", "train.seed=7"])
    again = load_config(TrainConfig, write(tmp_path, dump_config(config)))
    assert again == config


# Each script reads its own presets; every other preset is a training preset.
CONFIG_FOR = {
    "validate.toml": SweepConfig,
    "validate_demo.toml": SweepConfig,
    "generate_character.toml": GenerateConfig,
}


def test_presets_are_found():
    assert {"face.toml", "demo.toml", "validate.toml", "generate_character.toml"} <= {p.name for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads(preset):
    cls = CONFIG_FOR.get(preset.name, TrainConfig)
    config = load_config(cls, preset)
    assert isinstance(config, cls)
    if cls is TrainConfig:  # one embedding, or a cast of [[embeddings]], each with a name
        assert all(plan.embedding.name for plan in config.plans()) and config.save.output_dir


def test_run_records_carry_their_format_and_newer_ones_are_named(tmp_path):
    from library.config import CONFIG_FORMAT

    config = load_config(TrainConfig, None, ["model.checkpoint=builtin:toy", "embedding.name=x"])
    text = dump_config(config)
    assert text.startswith(f"format_version = {CONFIG_FORMAT}\n")
    assert load_config(TrainConfig, write(tmp_path, text)) == config
    # A record an older toolkit wrote (no format_version) still reads.
    older = "\n".join(line for line in text.splitlines() if not line.startswith("format_version"))
    assert load_config(TrainConfig, write(tmp_path, older)) == config
    newer = text.replace(f"format_version = {CONFIG_FORMAT}", f"format_version = {CONFIG_FORMAT + 1}")
    with pytest.raises(
        UserError, match=f"newer version of the toolkit \\(format_version {CONFIG_FORMAT + 1}\\)"
    ):
        load_config(TrainConfig, write(tmp_path, newer))


def test_the_sweep_names_a_run_record_it_cannot_read(tmp_path, capsys):
    import sweep_validate

    run = tmp_path / "run"
    (run / "embeddings").mkdir(parents=True)
    (run / "config.toml").write_text('format_version = 7\n[embedding]\nname = "x"\n')
    assert sweep_validate.main(["--config", "presets/validate.toml", f"run.folder={run}"]) == 2
    err = capsys.readouterr().err
    assert "config.toml: written by a newer version of the toolkit (format_version 7)" in err
