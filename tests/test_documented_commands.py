"""Every shell command line in README.md and docs/*.md runs, on a tiny model.

The command lines are read from the documents' ```bash blocks. A synopsis line is run in its
required form (``[...]`` options dropped, the first of ``a|b``) with the tiny model and corpus put
in for ``PATH`` and a few size options added; every option it shows, with each alternative, must
parse. A named text domain is a few of its documents, cut short. Placeholders (``RUN``,
``SMALL``, ``DRAFT`` …) are folder names in a scratch folder, so a command reads what an earlier
one wrote, as a reader following the documents would. A command that cannot run here is listed
in ``NOT_RUN`` with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bayesprune.run.cli import build_parser, main

from .test_cli import FIT_ARGS

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

NOT_RUN = {
    "bash scripts/run-default.sh": "the main job: the default model for minutes (its fit line is run below)",
    "bash scripts/test.sh": "the command that runs this suite",
    "bash scripts/test-latest.sh": "builds a second environment from the package index and runs this suite in it",
    "bash scripts/lock.sh .venv-latest": "runs this suite, then rewrites the lock",
    ".venv/bin/python bench/frontier.py": "a benchmark of hours on the default model",
    ".venv/bin/python bench/frontier.py --quick": "a benchmark on the default model",
}

# Size options that make each subcommand take seconds on the tiny model (later options win).
TINY = {
    "fit": FIT_ARGS,
    "extract": [],
    "evaluate": ["--eval-tokens", "256", "--eval-window", "64"],
    "depth": ["--removals", "2", "--windows", "6", "--chunk", "3", "--dtype", "float32",
              "--force"],  # the documents rank one RUN more than once
    "draft": ["--sizes", "0.5,0.8"],
    "router": ["--skipped", "1", "--route-after", "1", "--seq-len", "16", "--prompt-tokens", "4",
               "--search-windows", "4", "--train-windows", "8", "--check-windows", "4", "--dtype", "float32"],
    "route": ["--max-new-tokens", "4"],
}
# What a synopsis's value placeholders stand for when its options are parsed.
VALUES = {"N": "3", "C": "1.0", "TEXT": "hello"}


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) for each line of every ```bash block, comments stripped."""
    commands = []
    for document in DOCUMENTS:
        text = document.read_text()
        for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
            first = text[:block.start(1)].count("\n") + 1
            for offset, line in enumerate(block.group(1).splitlines()):
                command = re.sub(r"\s+#.*$", "", line).strip()
                if command and not command.startswith("#"):
                    commands.append((f"{document.relative_to(ROOT)}:{first + offset}", command))
    return commands


def _options_dropped(command: str) -> str:
    while re.search(r"\[[^\[\]]*\]", command):
        command = re.sub(r"\s*\[[^\[\]]*\]", "", command)
    return command


def _first_alternatives(words: list[str]) -> list[str]:
    return [word.split("|")[0] if "|" in word else word for word in words]


def _launcher(words: list[str]) -> tuple[list[str], list[str]]:
    """(the program as this environment runs it, the bayesprune arguments after it)."""
    if words[0] == "bayesprune":
        return [str(BIN / "bayesprune")], words[1:]
    if words[:3] == ["python", "-m", "bayesprune"]:
        return [sys.executable, "-m", "bayesprune"], words[3:]
    module = words.index("-m")
    assert words[module + 1] == "bayesprune", words
    program = [str(BIN / words[0]), *words[1:module]]
    if words[0] == "torchrun":
        program.insert(1, "--standalone")  # one machine, a free port
    return [*program, "-m", "bayesprune"], words[module + 2:]


def _substituted(words: list[str], model: Path, corpus: Path) -> list[str]:
    out = []
    for i, word in enumerate(words):
        previous = words[i - 1] if i else ""
        if previous == "--model" and word in ("PATH", "org/name"):
            word = str(model)
        elif previous == "--data" and word == "PATH":
            word = str(corpus)
        elif previous == "--domains":
            word = ",".join(_tiny_domain(name, corpus) for name in word.split(","))
        elif word == "runs/default":
            word = "RUN"
        word = re.sub(r"^\d+layers$", "2layers", word)  # the tiny model has 4 blocks
        if word != "...":
            out.append(word)
    return out


def _tiny_domain(name: str, corpus: Path) -> str:
    """A folder of a few short documents of the named domain (its first ones, cut short), beside the corpus."""
    from bayesprune.inputs.data import DOMAINS, domain_documents

    if name not in DOMAINS:
        return str(corpus)
    folder = corpus.parent / f"tiny-{name}"
    if not folder.is_dir():
        folder.mkdir()
        for i, document in enumerate(domain_documents(name)[:6]):
            (folder / f"{i}.txt").write_text(document.text[:6000])
    return str(folder)


def runnable(command: str, model: Path, corpus: Path) -> list[str]:
    """The command line as it runs here: required form, tiny model and corpus, tiny sizes."""
    program, arguments = _launcher(_first_alternatives(shlex.split(_options_dropped(command))))
    arguments = _substituted(arguments, model, corpus)
    subcommand = arguments[0]
    if subcommand in ("fit", "router", "route") and "--model" not in arguments:
        arguments += ["--model", str(model)]  # the default model is far too slow here
    if subcommand == "fit" and "--data" not in arguments:
        arguments += ["--data", str(corpus)]
    if subcommand == "router" and "--domains" not in arguments:
        from bayesprune.inputs.data import DOMAINS

        arguments += ["--domains", ",".join(_tiny_domain(name, corpus) for name in DOMAINS)]
    return [*program, *arguments, *TINY.get(subcommand, [])]


def expansions(command: str) -> list[list[str]]:
    """The bayesprune arguments of a synopsis with every option shown, once per alternative of each."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    _, arguments = _launcher(words)
    arguments = [VALUES.get(word, word) for word in arguments if word != "..."]
    widest = max([len(word.split("|")) for word in arguments] + [1])
    return [[word.split("|")[min(k, len(word.split("|")) - 1)] for word in arguments] for k in range(widest)]


COMMANDS = documented_commands()
RUNNABLE = [(where, command) for where, command in COMMANDS if command not in NOT_RUN]


def test_the_console_script_runs_the_command_line():
    done = subprocess.run([str(BIN / "bayesprune"), "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--target" in done.stdout


def test_the_documents_show_the_commands_this_suite_expects():
    shown = {command for _, command in COMMANDS}
    assert set(NOT_RUN) <= shown, f"NOT_RUN lists commands no document shows: {set(NOT_RUN) - shown}"
    launchers = {shlex.split(command)[0] for _, command in RUNNABLE}
    assert {"bayesprune", "torchrun", "accelerate", "python"} <= launchers
    assert {shlex.split(_options_dropped(c))[1] for _, c in RUNNABLE if c.startswith("bayesprune")} == set(TINY)


@pytest.mark.parametrize("where, command", RUNNABLE, ids=[where for where, _ in RUNNABLE])
def test_every_option_a_document_shows_parses(where, command):
    for arguments in expansions(command):
        if "--help" not in arguments:
            build_parser().parse_args(arguments)  # an unknown option or choice exits with status 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer, corpus_dir):
    """A scratch folder where the documents' placeholders are folder names, and the tiny model and corpus."""
    from .conftest import tiny_model

    root = tmp_path_factory.mktemp("documented")
    model = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    tokenizer.save_pretrained(model)
    return root, model, corpus_dir


@pytest.mark.parametrize("where, command", RUNNABLE, ids=[where for where, _ in RUNNABLE])
def test_every_documented_command_runs(where, command, workspace, monkeypatch, capsys):
    root, model, corpus = workspace
    line = runnable(command, model, corpus)
    if "--out" in line and (root / line[line.index("--out") + 1]).exists():
        # a second command writing to a name already written gets a name of its own, as a reader's would
        line[line.index("--out") + 1] += "-" + re.sub(r"\W", "_", where)
    if line[0] == str(BIN / "bayesprune"):
        # The console script's own entry point, called here: a process per command would double the time.
        monkeypatch.chdir(root)
        assert main(line[1:]) == 0, f"{where}: {shlex.join(line)}\n{capsys.readouterr().err[-3000:]}"
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(line, cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"{where}: {shlex.join(line)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
