from __future__ import annotations

import math
import random

import pytest

import dtune
from dtune.tune.spaces import resolve, validate_space


def test_every_domain_samples_inside_its_bounds():
    rng = random.Random(0)
    space = {
        "u": dtune.uniform(-1, 1),
        "lu": dtune.loguniform(1e-4, 1e-1),
        "q": dtune.quniform(0, 1, 0.25),
        "i": dtune.randint(3, 5),
        "c": dtune.choice(["a", "b"]),
        "nested": {"deep": dtune.uniform(10, 11), "const": 7},
        "const": "x",
    }
    for _ in range(500):
        config = resolve(space, rng)
        assert -1 <= config["u"] < 1
        assert 1e-4 <= config["lu"] < 1e-1
        assert config["q"] in (0, 0.25, 0.5, 0.75, 1.0)
        assert config["i"] in (3, 4)
        assert config["c"] in ("a", "b")
        assert 10 <= config["nested"]["deep"] < 11
        assert config["nested"]["const"] == 7 and config["const"] == "x"


def test_loguniform_is_uniform_in_log_space():
    rng = random.Random(1)
    values = [resolve({"x": dtune.loguniform(1e-4, 1.0)}, rng)["x"] for _ in range(4000)]
    below = sum(v < 1e-2 for v in values) / len(values)
    assert 0.45 < below < 0.55  # half the log-range lies below 1e-2


def test_sample_from_sees_resolved_values():
    space = {"a": dtune.randint(1, 10), "b": dtune.sample_from(lambda c: c["a"] * 2)}
    config = resolve(space, random.Random(0))
    assert config["b"] == 2 * config["a"]


def test_same_seed_same_configs():
    space = {"x": dtune.uniform(0, 1), "y": dtune.choice([1, 2, 3])}
    a = [resolve(space, r) for r in [random.Random(5)] for _ in range(10)]
    b = [resolve(space, r) for r in [random.Random(5)] for _ in range(10)]
    assert a == b


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lr": dtune.uniform(1, 0)}, r"param_space\['lr'\].*`low` must be < `high`"),
        ({"opt": {"lr": dtune.loguniform(0, 1)}}, r"param_space\['opt'\]\['lr'\].*must be > 0"),
        ({"c": dtune.choice([])}, r"param_space\['c'\].*at least one"),
        ({"g": dtune.grid([])}, r"param_space\['g'\].*at least one"),
        ({"q": dtune.quniform(0, 1, 0)}, r"param_space\['q'\].*`q` is 0"),
        ({"i": dtune.randint(0.5, 3)}, r"param_space\['i'\].*integers"),
        ({"u": dtune.uniform(0, math.inf)}, r"param_space\['u'\].*finite"),
    ],
)
def test_invalid_spaces_name_the_key(space, message):
    with pytest.raises(ValueError, match=message):
        validate_space(space)


def test_space_must_be_a_dict():
    with pytest.raises(TypeError, match="must be a dict"):
        validate_space([1, 2])
