"""Every ``vlprompt`` subcommand's ``--help``: it works, every argument is documented, and the
texts name only commands and options that exist."""

from __future__ import annotations

import argparse
import re

import pytest

from vlprompt.cli import build_parser, main


def _subparsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1, "vlprompt has one level of subcommands"
    return actions[0]


PARSER = build_parser()
SUBPARSERS = _subparsers_action(PARSER)
COMMANDS = sorted(SUBPARSERS.choices)


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Options and positionals of ``parser`` except the built-in -h/--help."""
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _help_texts(parser: argparse.ArgumentParser) -> list[str]:
    """The description and every argument's help of ``parser``, ``%(default)s`` expanded."""
    formatter = parser._get_formatter()
    texts = [parser.description or ""]
    for action in _arguments(parser):
        if action.help and action.help is not argparse.SUPPRESS:
            texts.append(formatter._expand_help(action))
    return texts


def _all_texts() -> list[tuple[str, str]]:
    """(where, text) for every description and help string of the whole command line."""
    out = [(f"vlprompt: {t[:40]!r}", t) for t in _help_texts(PARSER)]
    out += [(f"vlprompt (summary of {a.dest})", a.help or "") for a in SUBPARSERS._choices_actions]
    for name in COMMANDS:
        out += [(f"vlprompt {name}", t) for t in _help_texts(SUBPARSERS.choices[name])]
    return out


def test_there_are_subcommands():
    assert {"train", "eval", "methods", "run", "report", "predict", "datasets", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero_with_usage_and_description(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vlprompt {command}")
    description = SUBPARSERS.choices[command].description
    assert description and description.strip(), f"{command} has no description"
    # the description is printed (argparse re-wraps it: compare whitespace-normalised)
    assert " ".join(description.split()) in " ".join(out.split())


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlprompt")
    for command in COMMANDS:
        assert command in out


def test_every_subcommand_has_a_summary():
    summaries = {a.dest: a.help for a in SUBPARSERS._choices_actions}
    assert set(summaries) == set(COMMANDS)
    assert all(h and h.strip() for h in summaries.values()), summaries


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_every_argument_has_help(command):
    parser = PARSER if command is None else SUBPARSERS.choices[command]
    undocumented = [a.option_strings or [a.dest] for a in _arguments(parser)
                    if not isinstance(a, argparse._SubParsersAction)
                    and (not a.help or a.help is argparse.SUPPRESS or not a.help.strip())]
    assert not undocumented, f"vlprompt {command or ''}: arguments without help: {undocumented}"


def test_help_names_only_existing_commands():
    """`vlprompt <word>` in any help text names a real subcommand (or an option)."""
    wrong = []
    for where, text in _all_texts():
        for word in re.findall(r"\bvlprompt\s+([^\s`'\"]+)", text):
            word = word.strip(".,;:)(`'\"")
            if word.startswith("-") or word in COMMANDS:
                continue
            wrong.append(f"{where}: 'vlprompt {word}'")
    assert not wrong, wrong


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_only_existing_options(command):
    """A ``--option`` that a subcommand's help mentions is one of its own options."""
    parser = SUBPARSERS.choices[command]
    options = {s for a in parser._actions for s in a.option_strings}
    mentioned = set()
    for text in _help_texts(parser):
        mentioned |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert mentioned <= options, f"vlprompt {command}: help mentions {mentioned - options}"


def test_predict_help_documents_topk(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "--topk" in out
    flat = " ".join(out.lower().split())
    assert "top-5" not in flat and "top 5" not in flat and "top five" not in flat


def test_train_help_lists_methods(capsys):
    from vlprompt.methods import list_methods

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "coop" in out and "maple" in out
    for name in list_methods():
        assert name in out


def test_train_has_no_resume_noop_flag(capsys):
    options = {s for a in SUBPARSERS.choices["train"]._actions for s in a.option_strings}
    assert "--no-resume" in options and "--resume-from-tensors" in options
    assert "--resume" not in options
    # nor may argparse's prefix matching turn "--resume" into --resume-from-tensors
    with pytest.raises(SystemExit) as exc:
        main(["train", "--method", "coop", "--dataset", "eurosat", "--resume"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --resume" in capsys.readouterr().err
