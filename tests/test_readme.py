"""The README keeps its promises about itself: it is short and opens with the two set-up commands;
every command line it (and docs/) shows is accepted by its script's own argument parser, so a
renamed flag fails here; every file and link it names exists; and it cites no issue tracker a
reader cannot open. Nothing is trained: each script's parser is called on the line's words."""

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

import benchmark
import data
import dino
import knn_eval
import visualize

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
SETUP = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && python dino.py",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && python -m pytest -q tests",
]
SCRIPTS = ("dino.py", "knn_eval.py", "visualize.py", "benchmark.py")
def code_blocks(text: str) -> list:
    """(language, code) of each fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return re.sub(r"^```\w*\n.*?^```", "", text, flags=re.S | re.M)


def script_commands(code: str) -> list:
    """(script, args, line) for each `python SCRIPT ...` in a bash block, and for each torchrun or
    srun line the script it starts with the script's arguments: `\\` continuations joined, comments
    dropped, split at && || ; | &, leading VAR=value words and `do` left out."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, command = list(lexer), []
        for word in words + [";"]:
            if word not in ("&&", "||", ";", "|", "&"):
                command.append(word)
                continue
            while command and (re.match(r"^\w+=", command[0]) or command[0] in ("do", "then")):
                command.pop(0)
            if command[:1] in (["python"], ["python3"]) and len(command) > 1 and command[1] in SCRIPTS:
                found.append((command[1], command[2:], line.strip()))
            elif command[:1] in (["torchrun"], ["srun"]):
                at = next((i for i, w in enumerate(command) if w.endswith(SCRIPTS)), None)
                if at is not None:
                    found.append((Path(command[at]).name, command[at + 1:], line.strip()))
            command = []
    return found


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser (and its sub-commands') without prefix matching, so that `--time_lim` is no
    longer taken for `--time_limit`: a flag renamed in the code must fail the README's line."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strict(sub)
    return parser


def check_dino(args: list):
    strict(dino.build_parser(dino.Config())).parse_args(args)
    try:  # --data that needs no files (built in, or a CIFAR-10 folder to download): values too
        data.peek(dict(zip(args, args[1:])).get("--data", dino.Config.data))
    except data.DinoError:
        return  # a folder that is not here: the flags were checked above
    dino.parse_config(args)


def check(script: str, args: list):
    """Raise (SystemExit from argparse, DinoError from a value rule) unless the script takes args."""
    if script == "dino.py":
        check_dino(args)
    elif script == "knn_eval.py":
        strict(knn_eval.build_parser()).parse_args(args)
    elif script == "visualize.py":
        strict(visualize.build_parser()).parse_args(args)
    elif script == "benchmark.py":  # its own flags, then dino.py's
        _, rest = strict(benchmark.own_flags()).parse_known_args(args)
        check_dino(rest)


def all_commands() -> list:
    """(page, script, args, line) of the bash blocks of the README and docs/, and of their inline
    `python SCRIPT ...` spans (the tables name commands too)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for lang, code in code_blocks(text):
            if lang in ("bash", "sh", "shell"):
                found += [(page, *c) for c in script_commands(code)]
        for span in re.findall(r"`(python3? (?:%s)[^`]*)`" % "|".join(map(re.escape, SCRIPTS)), prose(text)):
            found += [(page, *c) for c in script_commands(span.replace("\n", " "))]
    return found


def test_the_readme_is_short_and_opens_with_the_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 320
    language, code = code_blocks(text)[0]
    assert language == "bash" and code.splitlines() == SETUP


def test_every_command_line_is_accepted_by_its_scripts_parser():
    commands = all_commands()
    readme = [c for c in commands if c[0] == README]
    assert len(readme) >= 30 and {c[1] for c in commands} == set(SCRIPTS)
    assert any(line.startswith("srun torchrun") for *_, line in commands)  # continuations joined (docs/)
    refused = []
    for page, script, args, line in commands:
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
                check(script, args)
        except (SystemExit, data.DinoError) as e:
            if isinstance(e, SystemExit) and not e.code:
                continue  # --help, printed
            refused.append(f"{page.relative_to(ROOT)}: {line}\n    {said.getvalue().strip().splitlines()[-1:] or e}")
    assert not refused, "\n".join(refused)


def test_a_renamed_flag_would_be_caught():
    for script, line in [("dino.py", "--data objects --time_lim 9"), ("knn_eval.py", "--raw_pixel"),
                         ("visualize.py", "attention --checkpt c.pth"), ("benchmark.py", "--step 3")]:
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
            check(script, shlex.split(line))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(page.read_text()), flags=re.M)}


def test_every_file_and_link_named_exists():
    missing = set()
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                missing.add(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                missing.add(f"{page.name}: {target} (no such heading)")
        names = re.findall(r"(?<![\w/.-])((?:assets/[\w.-]+\.png)|(?:docs/[\w.-]+\.md)|"
                           r"(?:notebooks/[\w.-]+\.ipynb)|(?:(?:[\w-]+/)*[\w-]+\.py))\b", text)
        for name in names:
            if not (ROOT / name).exists():
                missing.add(f"{page.name}: {name}")
        for file, test in re.findall(r"(tests/[\w-]+\.py)::(\w+)", text):
            if (ROOT / file).exists() and f"def {test}(" not in (ROOT / file).read_text():
                missing.add(f"{page.name}: {file}::{test}")
    assert not missing, sorted(missing)


def test_no_reference_to_an_issue_tracker_readers_cannot_open():
    for page in PAGES:
        found = re.findall(r"\bissues? \d+|closing notes?|\bsessions?\b", page.read_text(), flags=re.I)
        assert not found, (page.name, found)
