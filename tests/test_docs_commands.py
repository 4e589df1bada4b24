"""The commands README.md and docs/*.md show parse: every `fastrnn ...` and
`python bench/NAME.py ...` line of a ```sh block or an inline code span is handed
to the command's own argument parser (the command itself does not run), and the
repository files it names exist. Lines with placeholders (FILE, N, `...`,
`[options]`, `a|b`) are prose about a command, not a command, and are left out; an
inline span may name a flag without its value (`fastrnn bench --quantize`) or a
command without its required arguments (`fastrnn predict`), but every flag it names
must exist and every value it gives must be valid."""
import argparse
import pathlib
import re
import shlex
import sys

import pytest

from scripts import ROOT, load_script

# results-history.md is a log: its commands are as they were in their session
DOCS = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md")
                                     if p.name != "results-history.md")
_PLACEHOLDER = re.compile(r"\.\.\.|…|\[|\||error:|<")
_INCOMPLETE = ("expected one argument", "the following arguments are required")


def doc_commands():
    """[(file name, line, argv, inline)] of every command line in the docs, argv[0]
    being "fastrnn" or a bench/ script's path; environment assignments dropped;
    inline: from a code span in prose (else a shell block)."""
    found = []
    for path in DOCS:
        name = path.relative_to(ROOT).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        in_sh, i = False, 0
        while i < len(lines):
            line, start = lines[i], i + 1
            if line.startswith("```"):
                in_sh = not in_sh and line.strip() in ("```sh", "```bash", "```console")
                i += 1
                continue
            if in_sh:
                while line.endswith("\\") and i + 1 < len(lines):   # continued lines
                    i += 1
                    line = line[:-1] + " " + lines[i]
                candidates = [line.strip()]
            else:
                candidates = re.findall(r"`([^`]+)`", line)
            for text in candidates:
                try:
                    argv = shlex.split(text, comments=True)
                except ValueError:
                    continue
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                    argv = argv[1:]
                cut = [k for k, a in enumerate(argv) if a in ("&&", ";", "|", "2>&1")
                       or a.startswith(">")]
                argv = argv[:cut[0]] if cut else argv   # redirections, a next command
                if (argv[:1] == ["fastrnn"] or argv[:2] == ["python", "-m"]
                        and argv[2:3] == ["fastrnn.cli"]):
                    argv = ["fastrnn"] + argv[(1 if argv[0] == "fastrnn" else 3):]
                elif argv[:1] == ["python"] and len(argv) > 1 and re.fullmatch(
                        r"bench/\w+\.py", argv[1]):
                    argv = argv[1:]
                else:
                    continue
                if (len(argv) < 2 and argv[0] == "fastrnn" or _PLACEHOLDER.search(text)
                        or any(re.fullmatch(r"[A-Z_]+(\.\w+)?", a) for a in argv)):
                    continue
                found.append((name, start, argv, not in_sh))
            i += 1
    return found


COMMANDS = doc_commands()


class _Parsed(Exception):
    """Raised by the patched parse_args once the arguments have parsed."""


def test_the_docs_show_commands():
    # the collector finds what it is meant to: a change that broke it would pass every doc
    assert len(COMMANDS) >= 40
    assert any(argv[0] == "fastrnn" and argv[1] == "bench" for _, _, argv, _ in COMMANDS)
    assert any(argv[0].startswith("bench/") for _, _, argv, _ in COMMANDS)
    assert any(not inline for _, _, _, inline in COMMANDS)


@pytest.mark.parametrize("where,line,argv,inline", COMMANDS,
                         ids=[f"{n}:{l}" for n, l, _, _ in COMMANDS])
def test_doc_command_parses(where, line, argv, inline, monkeypatch, capsys):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)   # argparse errors exit here with status 2
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", list(argv))
    if argv[0] == "fastrnn":
        from fastrnn import cli
        entry = lambda: cli.main(argv[1:])
    else:
        entry = load_script(argv[0]).main
    try:
        entry()
    except _Parsed:
        pass
    except SystemExit as e:
        err = capsys.readouterr().err
        if inline and any(m in err for m in _INCOMPLETE):
            return   # a flag or a command named in prose
        pytest.fail(f"{where}:{line}: `{' '.join(argv)}` does not parse (exit {e.code}):\n"
                    f"{err}")
    else:
        pytest.fail(f"{where}:{line}: `{' '.join(argv)}` ran without parsing its arguments")
    for token in argv[1:]:
        if re.fullmatch(r"(examples|bench)/[\w./-]+\.(toml|py|txt)", token):
            assert (ROOT / token).is_file(), f"{where}:{line}: {token} does not exist"
