"""Sizes as the user writes them (edgecad.plan.units)."""
import pytest

from edgecad.errors import EdgecadError
from edgecad.measure import auto_budget
from edgecad.plan import parse_budget, parse_memory


def test_parse_memory():
    assert parse_memory(123, 0, auto_budget) == 123
    assert parse_memory("1.5GB", 0, auto_budget) == 1_500_000_000 and parse_memory("900MiB", 0) == 900 << 20
    assert parse_memory("50%", 3000, auto_budget) == 1500
    assert 0 < parse_memory("auto", 0, auto_budget)
    for bad in ("lots", "-5%", "0", "0%", "nan%", "12 parsecs"):
        with pytest.raises(EdgecadError, match="budget"):
            parse_memory(bad, 1000, auto_budget)


def test_parse_budget():
    assert parse_budget(None, 1000) is None
    assert parse_budget(123, 1000) == 123
    assert parse_budget("40%", 1000) == 400
    assert parse_budget("450MB", 1) == 450_000_000 and parse_budget("1.5GiB", 1) == 3 << 29
    assert parse_budget("2k", 1) == 2000 and parse_budget("auto", 1, auto_budget) > 0
    for bad in ("lots", "12 parsecs", "-5", "0", "%"):
        with pytest.raises(EdgecadError, match="budget"):
            parse_budget(bad, 1000)


def test_auto_is_what_the_caller_measures():
    """The pure parser reads "auto" only through the measurement it is given, and refuses it otherwise."""
    assert parse_memory("auto", 0, lambda: 123) == 123
    with pytest.raises(EdgecadError, match="cannot read memory budget 'auto'"):
        parse_memory("auto", 0)
