"""Compiling a rules directory: namespaces, externals, versions, errors, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway.scanning.commands import add_commands
from gateway.scanning.discovery import rule_files
from gateway.scanning.engine import EXTERNALS, RulesError
from gateway.scanning.rules import check_rules, compile_directory, find_errors

from .conftest import BUNDLED_RULES, write_rule

GOOD = 'rule good { strings: $a = "good" condition: $a }\n'
BROKEN = 'rule broken {\n  strings:\n    $a = "x"\n  condition:\n    $a and\n}\n'


def test_bundled_rules_compile() -> None:
    compiled = compile_directory(BUNDLED_RULES)
    names = {r.identifier for r in compiled.rules}
    assert {"EICAR_Test_File", "PE_Disguised_As_Content", "HTML_Smuggling_Embedded_Payload",
            "PowerShell_Hidden_Download_Cradle", "ClickFix_Clipboard_PowerShell"} <= names
    assert compiled.rule_count == len(names)
    assert compiled.warnings == ()  # no "slowing down scanning" strings
    assert len(compiled.version) == 16


def test_each_file_its_own_namespace(tmp_path: Path) -> None:
    # The same rule name in two files is fine: namespaces keep them apart.
    write_rule(tmp_path, "a.yar", GOOD)
    write_rule(tmp_path, "sub/dir/b.yara", GOOD)
    write_rule(tmp_path, "notes.txt", "not a rule")
    write_rule(tmp_path, ".hidden.yar", BROKEN)  # editor leftovers are skipped
    write_rule(tmp_path, ".git/x.yar", BROKEN)
    assert [ns for ns, _ in rule_files(tmp_path)] == ["a.yar", "sub/dir/b.yara"]
    compiled = compile_directory(tmp_path)
    assert compiled.rule_count == 2
    assert sorted(compiled.match(b"good", {})) == [
        "a.yar.good", "sub/dir/b.yara.good"]


def test_externals_declared(tmp_path: Path) -> None:
    conditions = " and ".join(f'{name} == ""' for name in EXTERNALS)
    write_rule(tmp_path, "ext.yar", f"rule all_externals {{ condition: {conditions} }}\n")
    assert set(EXTERNALS) >= {"filename", "filepath", "extension", "filetype", "url", "host",
                              "direction", "tenant", "owner"}
    assert compile_directory(tmp_path).match(b"", {})


def test_version_follows_content(tmp_path: Path) -> None:
    path = write_rule(tmp_path, "a.yar", GOOD)
    v1 = check_rules(tmp_path)[1]
    assert check_rules(tmp_path)[1] == v1  # stable
    path.write_text(GOOD.replace("good", "fine"))
    v2 = check_rules(tmp_path)[1]
    assert v2 != v1
    path.rename(tmp_path / "b.yar")  # same content, other namespace: other ruleset
    assert check_rules(tmp_path)[1] not in (v1, v2)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write_rule(tmp_path, "a.yar", GOOD)
    bad = write_rule(tmp_path, "sub/bad.yar", BROKEN)
    with pytest.raises(RulesError) as info:
        compile_directory(tmp_path)
    e = info.value
    assert (e.file, e.line) == (str(bad), 6)
    assert "syntax error" in e.message
    assert str(e) == f"{bad}:6: {e.message}"


def test_undefined_identifier_and_empty_dir(tmp_path: Path) -> None:
    write_rule(tmp_path, "u.yar", "rule u { condition: no_such_external == 1 }\n")
    with pytest.raises(RulesError, match=r"u\.yar:1: undefined identifier"):
        compile_directory(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RulesError, match=r"no \*\.yar or \*\.yara rule files"):
        check_rules(empty)
    with pytest.raises(RulesError, match="not a directory"):
        check_rules(tmp_path / "missing")


def test_find_errors_lists_every_broken_file(tmp_path: Path) -> None:
    write_rule(tmp_path, "a.yar", GOOD)
    write_rule(tmp_path, "b.yar", BROKEN)
    write_rule(tmp_path, "c.yar", "rule c { condition: nope }\n")
    assert [(Path(e.file).name, e.line) for e in find_errors(tmp_path)] == [("b.yar", 6), ("c.yar", 1)]


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_cli_rules_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_rule(tmp_path, "a.yar", GOOD)
    assert run_cli("rules", "check", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "1 rules in 1 files, version " in out
    assert run_cli("rules", "check", str(tmp_path), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["rules"]) == (True, 1)
    assert result["version"] == check_rules(tmp_path)[1]

    bad = write_rule(tmp_path, "b.yar", BROKEN)
    other = write_rule(tmp_path, "c.yar", "rule c { condition: nope }\n")
    assert run_cli("rules", "check", str(tmp_path)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{bad}:6: syntax error")
    assert err[1].startswith(f"{other}:1: undefined identifier")
    assert run_cli("rules", "check", str(tmp_path), "--json") == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert result["errors"][0] == {"file": str(bad), "line": 6, "message": result["errors"][0]["message"]}


def test_cli_rules_check_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_rule(tmp_path, "slow.yar", "rule s { strings: $a = /[a-z]+x/ condition: $a }\n")
    assert run_cli("rules", "check", str(tmp_path)) == 0
    assert 'string "$a" may slow down scanning' in capsys.readouterr().err


def test_cli_rules_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("rules", "bench", str(BUNDLED_RULES), "--seconds", "0.05", "--json") == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["rules"] >= 5
    assert figures["ms_per_1kib_scan"] > 0 and figures["mb_per_s_random"] > 0


def test_cli_rules_check_with_yara_x(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_rule(tmp_path, "a.yar", GOOD)
    assert run_cli("rules", "check", str(tmp_path), "--engine", "yara-x", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["rules"]) == (True, 1)
    assert result["version"] != check_rules(tmp_path)[1]  # the engine is part of the ISTag
    bad = write_rule(tmp_path, "b.yar", BROKEN)
    assert run_cli("rules", "check", str(tmp_path), "--engine", "yara-x") == 1
    assert capsys.readouterr().err.startswith(f"{bad}:6: ")
