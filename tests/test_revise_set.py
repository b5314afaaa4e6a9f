"""The revise set (benchmarks/data/revise-set.json) loads, and every record can score a
revision: its safe alternative has the action's shape and passes its rule, and the unsafe
action itself fails it (a rule that passes the original would score nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.revise_set import DATA, Rule, action_text, load_revise_set
from service.schemas import TextAction, ToolAction


def test_the_set_is_large_enough_and_its_ids_unique() -> None:
    cases = load_revise_set()
    assert len(cases) >= 85
    assert len({case.id for case in cases}) == len(cases)
    tools = sum(isinstance(case.request.action, ToolAction) for case in cases)
    assert 0 < tools < len(cases)  # both shapes are measured


def test_each_rule_tells_the_safe_alternative_from_the_unsafe_action() -> None:
    for case in load_revise_set():
        original, safe = case.request.action, case.safe_alternative
        assert type(safe) is type(original), case.id
        if isinstance(original, ToolAction):
            assert isinstance(safe, ToolAction)
            assert safe.tool == original.tool, case.id
            assert set(safe.arguments) <= set(original.arguments), case.id
        assert case.rule.passes(safe), case.id
        assert not case.rule.passes(original), case.id


def test_rules_match_case_insensitively_by_substring_or_regex() -> None:
    rule = Rule.from_json(
        {
            "must_contain": ["/HOME/me"],
            "must_not_contain": ["re:rm\\s+-rf\\s+/\\s*$"],
            "any_of": [["--dry-run", "re:-i\\b"], ["du"]],
        }
    )
    assert rule.passes(TextAction(text="du -sh /home/me --dry-run"))
    assert not rule.passes(TextAction(text="du -sh /home/me"))  # no alternative of group 1
    assert not rule.passes(TextAction(text="du /home/me -i; rm -rf /"))
    tool = ToolAction(tool="shell", arguments={"cmd": "du -i /home/me"})
    assert action_text(tool) == 'shell {"cmd": "du -i /home/me"}'
    assert rule.passes(tool)
    assert Rule.from_json({"any_of": ["a", "b"]}).passes(TextAction(text="b"))  # one group


@pytest.mark.parametrize(
    "rule", [{}, {"must_contain": [""]}, {"any_of": [[]]}, {"must": ["x"]}, {"any_of": ["re:("]}]
)
def test_a_rule_that_checks_nothing_or_cannot_be_read_is_refused(rule: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Rule.from_json(rule)


def test_a_broken_record_is_named(tmp_path: Path) -> None:
    raw = json.loads(DATA.read_text("utf-8"))[:1]
    raw[0]["safe_alternative"] = {"cmd": "no shape"}
    path = tmp_path / "set.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=raw[0]["id"]):
        load_revise_set(path)
