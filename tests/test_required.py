"""The helper that lets CI turn a machine-dependent skip into a failure (tests/required.py)."""

import pytest
from required import unavailable


@pytest.mark.parametrize(
    ("value", "outcome"), [(None, pytest.skip.Exception), ("0", pytest.skip.Exception), ("1", pytest.fail.Exception)]
)
def test_a_missing_need_skips_unless_its_flag_is_set(monkeypatch, value, outcome):
    if value is None:
        monkeypatch.delenv("DISTILFLOW_REQUIRE_PROBE", raising=False)
    else:
        monkeypatch.setenv("DISTILFLOW_REQUIRE_PROBE", value)
    with pytest.raises(outcome) as caught:
        unavailable("no probe here", "DISTILFLOW_REQUIRE_PROBE", "the probe test")
    want = "no probe here (DISTILFLOW_REQUIRE_PROBE=1: the probe test must run)" if value == "1" else "no probe here"
    assert str(caught.value) == want
