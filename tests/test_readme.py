"""The README's examples: the Python ones run, and every command-line example parses.

A reader pastes these first; an example that names a variable it never defined, or a flag
the command does not have, fails on the first try.
"""

import re
import shlex
from pathlib import Path

import pytest

import minqwen
from minqwen.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_python_api_example_runs_on_a_stand_in_checkpoint():
    """The first example, with the embedded model for "path/to/Qwen3.5-0.8B" and ids inside its vocabulary."""
    example = code_blocks("python")[0]
    for placeholder in ('"path/to/Qwen3.5-0.8B"', "[9707, 11, 1879]"):
        assert placeholder in example, f"the README's first Python example no longer holds {placeholder}"
    example = example.replace('"path/to/Qwen3.5-0.8B"', repr(str(minqwen.checkpoint.EMBEDDED)))
    example = example.replace("[9707, 11, 1879]", "[970, 11, 1879]")
    names: dict = {}
    exec(example, names)
    assert names["logits"].shape == (1, names["model"].config.vocab_size)
    assert names["cache"].position == 4 and names["snapshot"].position == 4


def test_the_text_in_text_out_example_runs_as_written(capsys):
    example = next(block for block in code_blocks("python") if "minqwen.checkpoint.EMBEDDED" in block)
    names: dict = {}
    exec(example, names)
    assert len(capsys.readouterr().out.strip()) > 0
    assert len(names["ids"]) > 1


def command_line_examples() -> list[str]:
    """Every `minqwen …` command in the README's shell blocks, also after `&&` or a pipe, comments cut."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].replace("…", "")  # comments follow two spaces; … is "and so on"
            for part in re.split(r"&&|\|", line):
                if part.strip().startswith("minqwen "):
                    commands.append(part.strip())
    return commands


def test_the_readme_shows_every_subcommand():
    parser = build_parser()
    shown = {parser.parse_args(shlex.split(command)[1:]).command for command in command_line_examples()}
    assert shown == {"generate", "chat", "inspect", "score", "golden"}


@pytest.mark.parametrize("line", command_line_examples())
def test_every_command_line_example_parses(line):
    """Each `minqwen …` line is accepted by the real parser (argparse exits with status 2 otherwise)."""
    words = shlex.split(line)[1:]
    args = build_parser().parse_args(words)
    assert callable(args.run)


def test_the_embedded_model_cards_file_table_gives_each_files_size():
    # The card is written by tools/train_embedded.py; a file changed afterwards (its chat
    # template, say) must be re-measured there too.
    folder = minqwen.checkpoint.EMBEDDED
    card = (folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([\d,]+) \|$", card, flags=re.M))
    files = {p.name for p in folder.iterdir() if p.is_file() and p.name != "MODEL_CARD.md"}
    assert set(rows) == files
    for name, size in rows.items():
        assert int(size.replace(",", "")) == (folder / name).stat().st_size, name
