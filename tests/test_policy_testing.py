"""Policy you can test before it bites: ``tether policy validate``, ``test`` and ``format``.

The operator's side, offline (no store): the real CLI (typer's CliRunner) on policy
directories written here, and on the demo's own policies and test cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tether.cli import _app as cli

pytestmark = pytest.mark.store_independent

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"
AGENT = "spiffe://acme.example/agent/a"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, list(args))
    return result.exit_code, result.output


def policies(tmp_path: Path, **files: str) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    for name, text in files.items():
        (directory / f"{name}.cedar").write_text(text)
    return directory


def test_the_demo_policies_pass_their_own_cases() -> None:
    code, output = run(
        "policy", "test", str(EXAMPLES / "policies"), str(EXAMPLES / "policy-tests" / "calls.toml"),
        "--json",
    )  # fmt: skip
    report = json.loads(output)
    assert code == 0, output
    assert report["failed"] == 0 and report["passed"] == len(report["cases"]) >= 5
    effects = {c["name"]: c["effect"] for c in report["cases"]}
    assert effects["a large payment waits for a human"] == "approval_required"
    assert effects["closing the account is not permitted"] == "deny"


def test_a_case_with_another_effect_fails_the_run(tmp_path: Path) -> None:
    directory = policies(
        tmp_path,
        calls='permit (principal, action == Action::"call_tool", resource == Tool::"kb.read");',
    )
    cases = tmp_path / "cases.toml"
    cases.write_text(
        f"""
[[case]]
name = "read"
agent = "{AGENT}"
owner = "o@acme.example"
tool = "kb.read"
expect = "allow"

[[case]]
name = "mail is expected to pass but is not permitted"
agent = "{AGENT}"
owner = "o@acme.example"
tool = "mail.send"
args = {{ to = "x@acme.example" }}
expect = "allow"
"""
    )
    code, output = run("policy", "test", str(directory), str(cases))
    assert code == 1
    assert "✓ read: allow" in output
    assert "✗ mail is expected to pass but is not permitted: deny" in output
    assert "expected allow" in output and "1 passed, 1 failed" in output


def test_an_evaluation_error_is_a_deny_as_in_a_decision(tmp_path: Path) -> None:
    """A rule whose arithmetic overflows errors at evaluation (the schema cannot see it);
    Cedar would skip the rule, a decision denies: so does the test."""
    directory = policies(
        tmp_path,
        calls='permit (principal, action == Action::"call_tool", resource == Tool::"pay") '
        "when { context.calls_used * 9223372036854775807 >= 0 };",
    )
    cases = tmp_path / "cases.json"
    case = {"agent": AGENT, "owner": "o@acme.example", "tool": "pay", "expect": "deny"}
    cases.write_text(json.dumps({"case": [{**case, "name": "overflow", "calls_used": 2}]}))
    code, output = run("policy", "test", str(directory), str(cases), "--json")
    result = json.loads(output)["cases"][0]
    assert code == 0, output
    assert result["effect"] == "deny" and result["errors"]


def test_malformed_cases_are_refused_clearly(tmp_path: Path) -> None:
    directory = policies(tmp_path, calls="permit (principal, action, resource);")
    cases = tmp_path / "cases.toml"
    cases.write_text(f'[[case]]\nagent = "{AGENT}"\nowner = "o"\ntool = "t"\nexpect = "maybe"\n')
    result = CliRunner().invoke(cli.app, ["policy", "test", str(directory), str(cases)])
    assert result.exit_code != 0
    assert "expect is one of allow, deny, approval_required" in str(result.exception)


def test_validate_names_the_file_and_line_of_an_invalid_policy(tmp_path: Path) -> None:
    directory = policies(
        tmp_path,
        good='permit (principal, action == Action::"call_tool", resource == Tool::"a");',
        bad='\n\npermit (principal, action == Action::"call_tool", resource)\n'
        "when { context.no_such_field == 1 };",
    )
    code, output = run("policy", "validate", str(directory), "--json")
    report = json.loads(output)
    assert code == 1 and report["ok"] is False
    [error] = report["findings"]
    assert error["level"] == "error" and error["where"] == "bad.cedar:3"


def test_validate_warns_about_wildcards_duplicates_and_shadowed_permits(tmp_path: Path) -> None:
    directory = policies(
        tmp_path,
        a='@id("everything")\npermit (principal, action, resource);',
        b='@id("every-tool")\npermit (principal, action == Action::"call_tool", resource);',
        c='@id("read")\npermit (principal, action == Action::"call_tool", resource == Tool::"r");\n'
        '@id("read-again")\n'
        'permit (principal, action == Action::"call_tool", resource == Tool::"r");',
        d='@id("mail")\npermit (principal, action == Action::"call_tool", resource == Tool::"m");\n'
        '@id("no-mail")\nforbid (principal, action, resource == Tool::"m");',
        e='@id("held")\n@approval("required")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"r");',
    )
    code, output = run("policy", "validate", str(directory), "--json")
    report = json.loads(output)
    assert code == 0 and report["ok"] is True, output
    found = {(f["code"], f["where"].split(" ")[1]) for f in report["findings"]}
    assert found == {
        ("policy.wildcard", "(everything)"),
        ("policy.every_tool", "(every-tool)"),
        ("policy.duplicate", "(read-again)"),
        ("policy.shadowed", "(mail)"),
    }, found
    # An approval forbid holds calls; it shadows nothing. --strict fails on warnings.
    assert run("policy", "validate", str(directory), "--strict")[0] == 1


def test_format_check_write_and_print(tmp_path: Path) -> None:
    source = (
        "// reads\n"
        '@id("r")\npermit (principal, action == Action::"call_tool", resource == Tool::"kb.read");'
    )
    directory = policies(tmp_path, a=source)
    code, output = run("policy", "format", str(directory), "--check")
    assert code == 1 and "would reformat" in output
    assert (directory / "a.cedar").read_text() == source  # --check changes nothing
    code, output = run("policy", "format", str(directory))
    assert code == 0 and "// a.cedar" in output and "// reads" in output
    assert run("policy", "format", str(directory), "--write")[0] == 0
    formatted = (directory / "a.cedar").read_text()
    assert formatted != source and "// reads" in formatted and 'Tool::"kb.read"' in formatted
    assert run("policy", "format", str(directory), "--check")[0] == 0
    assert run("policy", "validate", str(directory))[0] == 0


def test_admission_cases_see_the_context_admission_builds(tmp_path: Path) -> None:
    """A case opening a task with a pattern is judged on what the pattern covers, as
    admission judges it: ``shell.*`` puts ``shell.exec`` in ``context.tools``."""
    directory = policies(
        tmp_path,
        admit='@id("admit") permit (principal, action == Action::"open_task", resource)\n'
        'unless { context.tools.contains("shell.exec") };',
    )
    cases = tmp_path / "cases.toml"
    cases.write_text(
        f"""
[[case]]
name = "a pattern that covers shell.exec"
agent = "{AGENT}"
owner = "o@acme.example"
action = "open_task"
intent = {{ purpose = "p", capabilities = [{{ tool = "shell.*" }}] }}
expect = "deny"

[[case]]
name = "a plain read"
agent = "{AGENT}"
owner = "o@acme.example"
action = "open_task"
intent = {{ purpose = "p", capabilities = [{{ tool = "kb.read" }}] }}
expect = "allow"
"""
    )
    code, output = run("policy", "test", str(directory), str(cases))
    assert code == 0, output
