"""The README and every command's --help say what the code does: checked, so they cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pcam_prep.cli import main
from pcam_prep.sources.base import REASONS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def leaf_commands(group: click.Group = main, path: tuple[str, ...] = ()) -> dict[str, click.Command]:
    """'build', 'bench loader', ...: every command a user can run, subcommands of groups included."""
    found = {}
    for name, command in group.commands.items():
        found[" ".join((*path, name))] = command
        if isinstance(command, click.Group):
            found.update(leaf_commands(command, (*path, name)))
    return found


LEAVES = leaf_commands()
COMMANDS = sorted(LEAVES)


def help_text(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_that_runs_this_command(command: str) -> None:
    text = help_text(*command.split())
    assert "Example:" in text, f"`pcam-prep {command} --help` has no Example"
    example = text.split("Example:", 1)[1]
    assert f"pcam-prep {command}" in example


def test_readme_reject_table_lists_exactly_the_reasons_the_code_uses() -> None:
    table = re.findall(r"^\s*\| `([a-z-]+)` \| (.+?) \|$", README, flags=re.M)
    documented = {name: meaning for name, meaning in table if name in REASONS or "-" in name or name.isalpha()}
    assert set(documented) >= set(REASONS), f"missing from README: {sorted(set(REASONS) - set(documented))}"
    for name in REASONS:
        assert documented[name].startswith(REASONS[name]), name


def test_every_option_the_readme_names_exists_on_its_command() -> None:
    """`pcam-prep CMD ... --opt` in README code and prose: --opt must be in CMD's --help."""
    options = {name: {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
               for name, cmd in LEAVES.items()}
    checked = 0
    for line in README.splitlines():
        for command, rest in re.findall(r"pcam-prep (\w+)((?: [^`&|#]*)?)", line):
            sub = rest.split()[0] if rest.split() else ""
            if f"{command} {sub}" in options:
                command = f"{command} {sub}"
            elif command not in options:
                continue
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert option in options[command] | {"--help"}, f"README: `pcam-prep {command} {option}` does not exist"
                checked += 1
    assert checked > 20  # the README does show its commands with options


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    blocks = re.findall(r"```bash\n(.+?)\n```", README, flags=re.S)
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "pcam-prep build" in blocks[0] and "pytest" in blocks[1]
    assert blocks[1].strip() in ci


def test_the_trainer_imports_neither_dask_nor_the_build() -> None:
    import subprocess
    import sys

    probe = ("import sys, pcam_prep.train.loop, pcam_prep.train.predict; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed') "
             "or m.startswith(('pcam_prep.pipeline', 'pcam_prep.eda'))))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"
