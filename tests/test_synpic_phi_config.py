import numpy as np
import pytest

from diffalign.data.phi import phi_from_rank, ranks_from_phi, soft_preference, win_counts
from diffalign.synpic.config import ConfigError, load_config


def test_phi_matches_a_hand_computation_with_ties():
    # two scorers, four images
    scores = np.array(
        [
            [3.0, 1.0, 1.0, 0.0],  # scorer A: x0 beats 3, x1 and x2 tie (no credit), beat x3
            [0.0, 1.0, 2.0, 2.0],  # scorer B: x2 and x3 tie, both beat x0 and x1; x1 beats x0
        ]
    )
    # C = A-wins + B-wins: x0 3+0, x1 1+1, x2 1+2, x3 0+2
    assert win_counts(scores).tolist() == [3, 2, 3, 2]
    phi = soft_preference(scores)
    assert np.allclose(phi, np.array([3, 2, 3, 2]) / (2 * 3))
    assert ranks_from_phi(phi).tolist() == [0, 2, 0, 2]  # ties share the lower rank
    # all tied: nobody gets credit
    assert soft_preference(np.ones((3, 4))).tolist() == [0.0] * 4
    # a lower-is-better scorer is flipped
    assert np.allclose(soft_preference(np.array([[1.0, 2.0]]), higher_is_better=[False]), [1.0, 0.0])
    # batched rows
    assert soft_preference(np.stack([scores, -scores])).shape == (2, 4)
    with pytest.raises(ValueError):
        soft_preference(np.ones((2, 1)))
    # a NaN score never wins and is never beaten
    assert soft_preference(np.array([[np.nan, 1.0, 0.0]])).tolist() == [0.0, 0.5, 0.0]


def test_phi_from_rank_is_the_rank_as_one_lower_is_better_scorer():
    assert phi_from_rank([2, 0, 1]).tolist() == [0.0, 1.0, 0.5]
    assert np.allclose(phi_from_rank([0, 1, 1, 3]), [1.0, 1 / 3, 1 / 3, 0.0])  # ties: no credit to either
    ranks = np.array([[0, 1, 1, 3], [3, 0, 2, 1]])
    assert (ranks_from_phi(phi_from_rank(ranks)) == ranks).all()  # batched, and the way back


GOOD = {"generators": [{"type": "toy_render"}, {"type": "toy_render", "name": "b"}], "scorers": ["toy"]}


def _raw(**extra):
    import copy

    raw = copy.deepcopy(GOOD)
    raw.update(extra)
    return raw


def test_config_names_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'shard_siz'\. Did you mean 'shard_size'\?"):
        load_config(raw=_raw(shard_siz=3))
    with pytest.raises(ConfigError, match=r"'generators.1.corupt_p'\. Did you mean 'generators.1.corrupt_p'\?"):
        load_config(raw=_raw(), overrides=["generators.1.corupt_p=0.5"])
    raw = _raw()
    raw["generators"].append({"type": "diffusers", "model": "x", "stpes": 3})
    # the tagged union member named by `type` gives the valid keys, and only its own
    with pytest.raises(ConfigError, match=r"Did you mean 'generators.2.steps'\? Valid keys here: batch_size, ") as err:
        load_config(raw=raw)
    assert "corrupt_p" not in str(err.value)
    raw["generators"][2] = {"type": "difusers", "model": "x"}
    with pytest.raises(ConfigError, match=r"generators.2: Input tag 'difusers'.*Did you mean 'diffusers'\?"):
        load_config(raw=raw)
    with pytest.raises(ConfigError, match=r"prompts.source: .*Did you mean 'list'\? \(got 'lsit'\)"):
        load_config(raw=_raw(), overrides=["prompts.source=lsit"])


def test_config_overrides_and_checks():
    cfg = load_config(raw=_raw(), overrides=["generators.1.corrupt_p=0.5", "seed=7", "prompts.repeats=2"])
    assert cfg.generators[1].corrupt_p == 0.5 and cfg.seed == 7 and cfg.prompts.repeats == 2
    assert cfg.generators[0].name == "toy-render" and cfg.images_per_prompt == 2
    with pytest.raises(ConfigError, match="k = 3"):
        load_config(raw=_raw(k=3))
    with pytest.raises(ConfigError, match="unique"):
        load_config(raw={"generators": [{"type": "toy_render"}] * 2, "scorers": ["toy"]})
    with pytest.raises(ConfigError, match="at least 2 images"):
        load_config(raw={"generators": [{"type": "toy_render"}], "scorers": ["toy"]})
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(raw=_raw(), overrides=["seed"])
    with pytest.raises(ConfigError, match=r"'generators.2.size': '2' is not an index of a list of 2"):
        load_config(raw=_raw(), overrides=["generators.2.size=8"])
    with pytest.raises(ConfigError, match=r"'seed.x': 'seed' is not a section"):
        load_config(raw=_raw(seed=1), overrides=["seed.x=8"])
    raw = _raw()
    load_config(raw=raw, overrides=["generators.0.size=8", "seed=3"])
    assert raw == GOOD  # the caller's dict is not modified


def test_one_config_error_for_every_config():
    import diffalign.config

    assert ConfigError is diffalign.config.ConfigError


def test_every_generator_type_and_named_prompt_source_resolves():
    """The config's `type` tags and the lazy GENERATORS table agree, and every string names a factory."""
    import typing

    from diffalign.lazy import load_attr
    from diffalign.synpic.config import GeneratorConfig, PromptsConfig
    from diffalign.synpic.generators import GENERATORS
    from diffalign.synpic.run import PROMPT_FUNCTIONS

    members = typing.get_args(typing.get_args(GeneratorConfig)[0])
    assert {typing.get_args(m.model_fields["type"].annotation)[0] for m in members} == set(GENERATORS)
    assert all(callable(load_attr(target)) for target in GENERATORS.values())
    assert set(PROMPT_FUNCTIONS) <= set(typing.get_args(PromptsConfig.model_fields["source"].annotation))
    assert load_attr(PROMPT_FUNCTIONS["toy"])()[0] == "a red circle"
