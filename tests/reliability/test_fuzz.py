"""Property-based fuzzing of the parsers users feed text into: --set values, scenario names, result JSON."""

from __future__ import annotations

import json
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clbench.config import RunConfig, coerce, parse_set, split_overrides
from clbench.errors import UsageError
from clbench.registry import SCENARIOS, STRATEGIES
from clbench.reporting.results import SCHEMA_VERSION, RunResult, load

FIELD_TYPES = typing.get_type_hints(RunConfig)
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(FIELD_TYPES)), value=text)
def test_set_values_coerce_or_fail_cleanly(field, value):
    typ = FIELD_TYPES[field]
    try:
        out = coerce(value, typ, field)
    except UsageError as e:
        assert field in str(e) and "\n" not in str(e)
        return
    allowed = typing.get_args(typ) or (typ,)
    assert isinstance(out, allowed) or out is None


@settings(max_examples=300, deadline=None)
@given(items=st.lists(text, max_size=4))
def test_parse_set_returns_pairs_or_fails_cleanly(items):
    try:
        pairs = parse_set(items)
    except UsageError as e:
        assert "key=value" in str(e)
        return
    assert all(k and "=" not in k for k in pairs)


@settings(max_examples=200, deadline=None)
@given(pairs=st.dictionaries(text, text, max_size=3))
def test_overrides_are_routed_or_rejected(pairs):
    cls = STRATEGIES.get("er").Config
    try:
        run, strat = split_overrides(pairs, cls, "--set")
    except UsageError as e:
        assert "\n" not in str(e)
        return
    assert set(run) | set(strat) == {k.replace("-", "_") for k in pairs}


@settings(max_examples=300, deadline=None)
@given(name=text)
def test_scenario_lookup_never_crashes(name):
    try:
        factory = SCENARIOS.get(name)
    except UsageError as e:
        assert "expected one of" in str(e)
        return
    assert callable(factory)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=json_values, extra=st.dictionaries(st.sampled_from(
    ["schema_version", "accuracy_matrix", "strategy", "scenario", "seed", "metrics", "status"]), json_values, max_size=5))
def test_loading_arbitrary_json_is_a_result_or_a_usage_error(tmp_path, payload, extra):
    for data in (payload, extra):
        path = tmp_path / "r.json"
        path.write_text(json.dumps(data))
        try:
            r = load(path)
        except UsageError as e:
            assert "r.json" in str(e)
            continue
        assert isinstance(r, RunResult)
        assert data["schema_version"] <= SCHEMA_VERSION


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"{", b"[1, 2]", b'{"schema_version": "1", "accuracy_matrix": []}'])
def test_loading_broken_files(tmp_path, raw):
    path = tmp_path / "r.json"
    path.write_bytes(raw)
    with pytest.raises(UsageError):
        load(path)
