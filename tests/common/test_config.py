"""Config validation, presets and the command line."""

import dataclasses

import pytest

from common import config as config_lib
from common import presets
from common.config import (ConfigError, DQNConfig, EnvConfig, FlowConfig, PPOConfig, SACConfig,
                           TrainConfig)


def make(**changes):
    changes.setdefault("exp_name", "t")
    return presets.replace(presets.get_preset("cartpole_ppo"), **changes)


@pytest.mark.parametrize("changes, flag", [
    ({"resume": True, "overwrite": True}, "--resume and --overwrite"),
    ({"total_timesteps": 0}, "--total-timesteps"),
    ({"log_interval": -1}, "--log-interval"),
    ({"save_interval": 15}, "--save-interval"),
    ({"max_to_keep": 0}, "--max-to-keep"),
    ({"fsdp_devices": 0}, "--fsdp-devices"),
    ({"exp_name": ""}, "--exp-name"),
    ({"algo.num_minibatches": 3}, "--algo.num-minibatches"),
    ({"algo.lr": 0.0}, "--algo.lr"),
    ({"algo.gamma": 1.5}, "--algo.gamma"),
    ({"algo.hidden_sizes": ()}, "--algo.hidden-sizes"),
    ({"env.num_envs": 0}, "--env.num-envs"),
    ({"env.id": ""}, "--env.id"),
    ({"total_timesteps": 100}, "--total-timesteps"),
])
def test_validation_names_the_flag(changes, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        make(**changes)


def test_dict_round_trip():
    cfg = make(**{"algo.hidden_sizes": (32, 16), "env.normalize_obs": True})
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


def test_presets_unique_and_valid():
    for name, (description, cfg) in presets.PRESETS.items():
        assert cfg.name == name and description
        assert cfg.num_updates >= 1


def test_unknown_preset_suggests_closest():
    with pytest.raises(ConfigError, match="cartpole_ppo"):
        presets.get_preset("cartpol_ppo")


def test_cli_overrides_and_errors(capsys):
    cfg = presets.cli(["cartpole_ppo", "--exp-name", "r1", "--algo.lr", "1e-3",
                       "--algo.num-steps", "64", "--env.num-envs", "8"])
    assert (cfg.exp_name, cfg.algo.lr, cfg.algo.num_steps, cfg.env.num_envs) == ("r1", 1e-3, 64, 8)
    assert cfg.name == "cartpole_ppo"
    with pytest.raises(SystemExit):
        presets.cli(["cartpol", "--exp-name", "r1"])
    assert "Did you mean: cartpole_ppo" in capsys.readouterr().err


def test_cli_default_preset_for_algorithm_entry_point():
    cfg = presets.cli(["--exp-name", "r1", "--algo.lr", "3e-4"], presets=["cartpole_ppo"],
                      default="cartpole_ppo")
    assert cfg.name == "cartpole_ppo" and cfg.algo.lr == 3e-4


def test_every_field_has_a_docstring():
    # tyro shows these in --help; a field without one is a hole in the CLI docs.
    import inspect

    for cls in (TrainConfig, EnvConfig, PPOConfig, DQNConfig, SACConfig, FlowConfig):
        source = inspect.getsource(cls)
        for field in dataclasses.fields(cls):
            after = source.split(f"    {field.name}:", 1)[1].split("\n", 2)[1]
            assert after.strip().startswith('"""'), f"{cls.__name__}.{field.name} has no docstring"
