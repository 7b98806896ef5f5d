"""Policies: validation that names the field and the value, and loading from files and env."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from agentguard import Budget, Downgrade, Policy, PolicyError


def test_issue_example_policy() -> None:
    p = Policy(
        max_cost_usd="0.25",
        max_model_calls=12,
        max_tool_calls=30,
        max_retries=3,
        max_output_tokens=800,
        context_budget_tokens=3000,
        soft_limits=(0.8, 0.5),
        downgrade=[Downgrade(at=0.6, to="gpt-4o-mini")],
        on_limit="finish",
    )
    assert p.max_cost_usd == Decimal("0.25")
    assert isinstance(p.max_cost_usd, Decimal)
    assert p.soft_limits == (0.5, 0.8)
    assert p.has_cost_limit


@pytest.mark.parametrize(
    ("data", "field", "value"),
    [
        ({"max_cost_usd": "-1"}, "max_cost_usd", "-1"),
        ({"max_cost_usd": "a lot"}, "max_cost_usd", "a lot"),
        ({"max_cost_usd": 0.1}, "max_cost_usd", 0.1),
        ({"on_limit": "explode"}, "on_limit", "explode"),
        ({"max_model_calls": -3}, "max_model_calls", -3),
        ({"soft_limits": [0.5, 1.5]}, "soft_limits", [0.5, 1.5]),
        ({"downgrade": [{"at": 1.5, "to": "gpt-4o-mini"}]}, "downgrade.0.at", 1.5),
        ({"max_cost_usd_typo": "1"}, "max_cost_usd_typo", "1"),
        ({"budgets": [{"scope": "team"}]}, "budgets.0", {"scope": "team"}),
    ],
)
def test_errors_name_field_and_value(data: dict[str, object], field: str, value: object) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.build(data)
    assert info.value.field == field
    assert info.value.value == value
    assert f"{field}={value!r}" in str(info.value)


def test_ladder_must_ascend() -> None:
    with pytest.raises(PolicyError, match="increasing order"):
        Policy(downgrade=[Downgrade(at=0.8, to="a"), Downgrade(at=0.5, to="b")])


def test_policy_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="on_limit"):
        Policy(on_limit="nope")  # type: ignore[arg-type]


def test_toml_file_top_level_and_pyproject(tmp_path: Path) -> None:
    f = tmp_path / "agentguard.toml"
    f.write_text(
        'max_cost_usd = "0.50"\non_limit = "finish"\n'
        '[[downgrade]]\nat = 0.6\nto = "gpt-4o-mini"\n'
        '[[budgets]]\nscope = "team"\nmax_cost_usd = "20"\nwindow = "day"\n'
    )
    p = Policy.from_file(f)
    assert p.max_cost_usd == Decimal("0.50")
    assert p.downgrade[0].to == "gpt-4o-mini"
    assert p.budgets[0] == Budget(scope="team", max_cost_usd="20", window="day")  # type: ignore[arg-type]
    py = tmp_path / "pyproject.toml"
    py.write_text("[tool.agentguard]\nmax_model_calls = 4\n")
    assert Policy.from_file(py).max_model_calls == 4


def test_bad_file_names_file_field_and_value(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("max_cost_usd: '-2'\nmax_steps: 3\n")
    with pytest.raises(PolicyError) as info:
        Policy.from_file(f)
    assert str(f) in str(info.value)
    assert "max_cost_usd='-2'" in str(info.value)
    broken = tmp_path / "b.toml"
    broken.write_text("max_cost_usd = \n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.from_file(broken)
    with pytest.raises(PolicyError, match=r"expected a \.toml"):
        Policy.from_file(tmp_path / "x.ini")


def test_yaml_and_json(tmp_path: Path) -> None:
    y = tmp_path / "p.yml"
    y.write_text("agentguard:\n  max_cost_usd: '1.25'\n  tool_limits: {search: 3}\n")
    assert Policy.from_file(y).tool_limits == {"search": 3}
    j = tmp_path / "p.json"
    j.write_text('{"max_retries": 2}')
    assert Policy.from_file(j).max_retries == 2


def test_from_env() -> None:
    env = {
        "AGENTGUARD_MAX_COST_USD": "0.25",
        "AGENTGUARD_ON_LIMIT": "finish",
        "AGENTGUARD_DOWNGRADE": '[{"at": 0.6, "to": "gpt-4o-mini"}]',
        "AGENTGUARD_TAGS": '{"env": "prod"}',
        "AGENTGUARD_DB": "ignored.db",
        "OTHER": "x",
    }
    p = Policy.from_env(environ=env)
    assert (p.max_cost_usd, p.on_limit, p.tags) == (Decimal("0.25"), "finish", {"env": "prod"})
    with pytest.raises(PolicyError, match="no policy field named 'max_cost'"):
        Policy.from_env(environ={"AGENTGUARD_MAX_COST": "1"})
    with pytest.raises(PolicyError, match="expected JSON"):
        Policy.from_env(environ={"AGENTGUARD_DOWNGRADE": "gpt-4o-mini@0.6"})
