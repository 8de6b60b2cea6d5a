"""Chapter parameters as users type them, and unknown ones refused (papermill passes strings)."""

import pytest

from influence_lib.experiments.notebook import parameters, parse_overrides, parse_seeds

ACCEPTED = ["profile", "seeds", "overrides", "jobs", "scheduler"]


def _ns(**kw):
    return {"profile": None, "seeds": None, "overrides": {}, "jobs": None, "scheduler": None, "np": __import__("math"),
            "display": print, "OPTIONAL_DEFAULTS": {"a": 1}, "_": 3, "In": [], **kw}


@pytest.mark.parametrize("typed, seeds", [(5, [0, 1, 2, 3, 4]), ("5", [0, 1, 2, 3, 4]), ("[0, 2]", [0, 2]),
                                          ("0,2", [0, 2]), ([3], [3]), (None, None), ("None", None)])
def test_seeds_as_typed(typed, seeds):
    ns = _ns(seeds=typed)
    assert parameters(ns, ACCEPTED)["seeds"] == seeds and ns["seeds"] == seeds


@pytest.mark.parametrize("bad", ["abc", 0, -1, "[]", "[1.5]", True])
def test_bad_seeds_are_refused_before_any_work(bad):
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds(bad)


def test_overrides_and_jobs_as_typed():
    ns = _ns(overrides='{"loo_steps": 500}', jobs="2", profile="quick")
    out = parameters(ns, ACCEPTED)
    assert out["overrides"] == {"loo_steps": 500} and out["jobs"] == 2 and out["profile"] == "quick"
    with pytest.raises(ValueError, match="overrides"):
        parse_overrides("{not json")
    with pytest.raises(ValueError, match="overrides"):
        parse_overrides("[1, 2]")
    with pytest.raises(ValueError, match="jobs"):
        parameters(_ns(jobs="zero"), ACCEPTED)
    with pytest.raises(ValueError, match="profile"):
        parameters(_ns(profile="fast"), ACCEPTED)


def test_an_unknown_parameter_is_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown chapter parameter\(s\) \['steps'\].*accepts"):
        parameters(_ns(steps=20000), ACCEPTED)
