"""The command line answers at once: ``--help`` of every subcommand and a rejected argument import
neither torch nor transformers nor nnsight (each in a fresh interpreter, so nothing this test
process imported counts). A subcommand added to ``selfrepair.cli.COMMANDS`` is checked too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfrepair.cli import COMMANDS, parser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "nnsight")
# runs the CLI's main() in a fresh interpreter and reports, as its last stderr line, which of
# HEAVY were imported when it returned (after argparse's SystemExit too)
RUN = """
import json, sys
from selfrepair.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def cli(*argv: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, everything printed) of ``selfrepair *argv``."""
    done = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["code"], report["imported"], done.stdout + done.stderr


def test_every_subcommand_is_registered():
    sub = next(a for a in parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("argv", [[], *([name] for name in COMMANDS)], ids=lambda a: " ".join(a) or "top")
def test_help_imports_no_model_library(argv):
    code, imported, out = cli(*argv, "--help")
    assert code == 0 and "usage: selfrepair" in out, out
    assert imported == [], f"`selfrepair {' '.join(argv)} --help` imported {imported}"


@pytest.mark.parametrize("argv, says", [
    (["book", "--tokens", "-5"], "argument --tokens: must be at least 1, got -5"),
    (["sweep", "--tokens", "many"], "argument --tokens: must be a whole number, got 'many'"),
    (["book", "--seq-len", "1"], "argument --seq-len: must be at least 2"),
    (["book", "--top-percent", "0"], "argument --top-percent: must be in (0, 100]"),
    (["book", "--profile", "nope"], "unknown profile 'nope': use one of"),
    (["book", "--chapters", "42"], "no chapter matches 42"),
    (["student", "--chapters", "42"], "no chapter matches 42"),
    (["book", "--param", "n_tokens"], "--param takes name=value"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_rejected_argument_answers_without_a_model_library(argv, says):
    code, imported, out = cli(*argv)
    assert code == 2 and says in out, out
    assert imported == [], f"`selfrepair {' '.join(argv)}` imported {imported} before rejecting it"


def test_the_check_sees_a_heavy_import(tmp_path):
    """The probe can fail: a command that gets past the argument checks does import torch."""
    code, imported, out = cli("sweep", "--model", "tiny-nosuchfamily", "--dataset", "tiny",
                              "--out", str(tmp_path))
    assert code == 2 and "torch" in imported, out
