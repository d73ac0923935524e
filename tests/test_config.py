from __future__ import annotations

from pathlib import Path

import pytest

from unexrl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["small", "default", "paper"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert len(cfg.cascade.stages) == 3


def test_paper_config_has_paper_sizes() -> None:
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    assert cfg.world.n_users >= 27_000 and cfg.world.n_items >= 1_000_000


def test_overrides_keep_types_and_reach_lists() -> None:
    cfg = load_config(
        None,
        [
            "cascade.pool_size=500",
            "seeds.evaluation=[7, 8]",
            "cascade.stages.0.keep=50",
            "world.user_types.1.fatigue=0.5",
        ],
    )
    assert cfg.cascade.pool_size == 500
    assert cfg.seeds.evaluation == (7, 8)
    assert cfg.cascade.stages[0].keep == 50
    assert cfg.world.user_types[1].fatigue == 0.5


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("world.n_itemz=5", "world.n_itemz"),
        ("world.n_items=lots", "world.n_items"),
        ("world.n_items=1.5", "world.n_items"),
        ("cascade.stages.0.heads=[affinity, bogus]", "cascade.stages.0.heads"),
        ("cascade.stages.1.keep=400", "cascade.stages.1.keep"),
        ("seeds.evaluation=[1000]", "seeds.train and seeds.evaluation"),
        ("seeds.evaluation=[3000, 3001, 3000]", "seeds.evaluation [3000, 3001, 3000] names a seed twice"),
    ],
)
def test_bad_values_name_the_key(override: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("world:\n  n_users: 10\n  colour: blue\n")
    with pytest.raises(ConfigError, match=r"world\.colour"):
        load_config(path)


def test_exponent_without_a_dot_is_a_number() -> None:
    assert load_config(None, ["algo.actor_lr=3e-5"]).algo.actor_lr == 3e-5
    assert load_config(None, ["name=run-1"]).name == "run-1"


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["no-equals-sign"])
