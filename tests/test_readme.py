"""The README is a contract: every `zenlm ...` command it shows exists (and, where a code block
spells a command out in full, parses), and every Python snippet runs as written.

A Python block may be skipped by an HTML comment on the line before its fence,
``<!-- readme-test: REASON -->`` (kept for what needs a running server; tests/test_demo.py
runs that one against a real `make demo`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from zenlm.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*(.+?)\s*-->")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None  # the reason given in a readme-test comment just above


def code_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        above = lines[start - 1] if start else ""
        reason = SKIP.search(above)
        blocks.append(Block(m[1], "\n".join(body) + "\n", start + 1, reason[1] if reason else None))
        i += 1
    return blocks


def block_commands(block: Block) -> list[str]:
    """The `zenlm ...` command lines of a shell block (continuations joined, `$ ` prompts dropped)."""
    joined = block.code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.split(r"\s+#\s", line.strip().removeprefix("$ "))[0].strip()
        if line.startswith("zenlm ") or line.startswith(".venv/bin/zenlm "):
            out.append(line.removeprefix(".venv/bin/"))
    return out


def inline_commands(text: str) -> list[str]:
    """`zenlm ...` spans in prose and tables (these may hold placeholders: only the command is checked)."""
    return [m.replace("\\|", "|") for m in re.findall(r"`(zenlm [^`]+)`", text)]


def words(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in a placeholder-laden line: plain split will do
        return command.split()


def command_path(tokens: list[str]) -> list[str]:
    """The (sub)command words at the start of ``tokens`` (after `zenlm`), walking the real parser;
    a word that is not a command where the parser wants one is a failure."""
    parser, path = build_parser(), []
    rest = tokens[1:]
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return path
        choices = subs[0].choices
        if not rest or rest[0] not in choices:
            shown = " ".join(["zenlm", *path, *rest[:1]])
            raise AssertionError(f"the README shows `{shown} ...`, but zenlm has no such command "
                                 f"(choices after `zenlm {' '.join(path)}`: {', '.join(sorted(choices))})")
        path.append(rest[0])
        parser = choices[rest.pop(0)]


TEXT = README.read_text(encoding="utf-8")
BLOCKS = code_blocks(TEXT)
SHELL_COMMANDS = sorted({c for b in BLOCKS if b.lang in ("", "bash", "sh", "console") for c in block_commands(b)})
ALL_COMMANDS = sorted(set(SHELL_COMMANDS) | set(inline_commands(TEXT)))
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def test_the_readme_shows_commands_and_snippets():
    # the parsers below would pass vacuously on a README they cannot read
    assert len(ALL_COMMANDS) > 30 and len(PYTHON) >= 3
    assert "zenlm evaluate chat MODEL --data chat.jsonl" in SHELL_COMMANDS


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_every_readme_command_answers_help(command, capsys):
    path = command_path(words(command))
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: zenlm {' '.join(path)}".rstrip())


PLACEHOLDER = re.compile(r"[\[\]|]|\.\.\.|…")


@pytest.mark.parametrize("command", [c for c in SHELL_COMMANDS if not PLACEHOLDER.search(c)])
def test_every_spelled_out_readme_command_parses(command):
    """A command a reader can paste (no [options], a|b or ...) must get past the argument parser:
    no missing required option, no unknown flag, no bad choice."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(words(command)[1:])
    except SystemExit:
        raise AssertionError(f"`{command}` as the README shows it: {stderr.getvalue().strip()}") from None
    assert callable(args.func)


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: f"README.md:{b.line}")
def test_every_readme_python_snippet_runs(block, tmp_path, monkeypatch, capsys):
    """Each Python block runs on its own, in an empty folder. A ``print(...)  # TEXT`` line says
    what it prints: those lines are compared, in order, with what was printed."""
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(tmp_path)
    exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    expected = [m[1].strip() for m in re.finditer(r"^\s*print\(.*\)\s+#\s*(.+)$", block.code, re.M)]
    prints = len(re.findall(r"^\s*print\(", block.code, re.M))
    assert len(printed) == prints, printed
    commented = [out for out, line in zip(printed, [ln for ln in block.code.splitlines()
                                                     if re.match(r"^\s*print\(", ln)]) if "#" in line]
    assert commented == expected


def test_readme_python_skips_stay_few_and_say_why():
    skipped = [b for b in PYTHON if b.skip]
    assert len(skipped) <= 1 and all("make demo" in b.skip for b in skipped)
