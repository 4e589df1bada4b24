"""The Python examples of README.md and docs/*.md run as written.

Every ```python block of a file runs, in order, in one namespace (a later block may
use an earlier one's names), in a fresh interpreter (blocks may set process-wide
settings) whose working directory is a temporary one. Markdown comments, which do
not show on the rendered page, steer it:

    <!-- doctest-setup
    x = ...            (runs here, unseen: the names a fragment takes as given)
    -->
    <!-- doctest: skip: REASON -->          (the next block is not run: a signature
                                             list, a cluster address; REASON required)
    <!-- doctest: requires: torch, onnx --> (the next block runs only where those
                                             import; blocks without it may not use
                                             its names)

A block that raises fails the test with its traceback, whose lines are the file's.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

_FENCE = re.compile(r"^```python\s*$")
_DIRECTIVE = re.compile(r"^<!-- doctest: (skip|requires): (.+?) -->\s*$")


def doc_blocks(path):
    """[(kind, first line, code, argument)] of a Markdown file, in order: kind is
    "run", "setup", "skip" (argument: the reason) or "requires" (argument: module
    names)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, pending, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        if directive:
            pending = (directive.group(1), directive.group(2).strip(), i + 1)
            i += 1
            continue
        if line.strip() == "<!-- doctest-setup":
            end = lines.index("-->", i)
            blocks.append(("setup", i + 2, "\n".join(lines[i + 1:end]), None))
            i = end + 1
            continue
        if _FENCE.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            code = "\n".join(lines[i + 1:end])
            if pending is not None and pending[2] != i:
                raise AssertionError(f"{path.name}:{pending[2]}: a doctest directive must "
                                     f"be the line just above a ```python fence")
            kind, arg = ("run", None) if pending is None else pending[:2]
            blocks.append((kind, i + 2, code, arg))
            pending = None
            i = end + 1
            continue
        if pending is not None and line.strip():
            raise AssertionError(f"{path.name}:{pending[2]}: a doctest directive must be "
                                 f"the line just above a ```python fence")
        i += 1
    return blocks


# Runs in the fresh interpreter: blocks as JSON on stdin, one JSON result per block out,
# each on a line of its own after _MARK (what the examples print is not mistaken for one).
_MARK = "@@fastrnn-doc-result@@ "
_DRIVER = r"""
import importlib.util, json, sys, traceback
namespace = {"__name__": "__doc_example__"}
for kind, name, line, code, requires in json.load(sys.stdin):
    if kind == "requires":
        missing = [m for m in requires if importlib.util.find_spec(m) is None]
        if missing:
            print(MARK + json.dumps(["missing", line, missing]), flush=True)
            continue
    try:
        exec(compile("\n" * (line - 1) + code, name, "exec"), namespace)   # the file's line numbers
    except BaseException:
        print(MARK + json.dumps(["failed", line, traceback.format_exc(limit=-3)]), flush=True)
        sys.exit(0)
    print(MARK + json.dumps(["ran", line, None]), flush=True)
"""


@pytest.mark.parametrize("path", [p for p in DOCS if any(_FENCE.match(l) for l in
                                                         p.read_text().splitlines())],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_examples_run(path, tmp_path):
    name = path.relative_to(ROOT).as_posix()
    blocks = doc_blocks(path)
    for kind, line, code, arg in blocks:
        if kind == "skip":
            assert arg, f"{name}:{line}: a skipped example says why"
    todo = [[kind, name, line, code, [m.strip() for m in arg.split(",")] if kind == "requires"
             else None] for kind, line, code, arg in blocks if kind != "skip"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, "-c", f"MARK = {_MARK!r}\n" + _DRIVER],
                          input=json.dumps(todo), cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=600)
    results = [json.loads(l[len(_MARK):]) for l in proc.stdout.splitlines()
               if l.startswith(_MARK)]
    failed = [r for r in results if r[0] == "failed"]
    assert not failed, f"{name}:{failed[0][1]}: the example raised\n{failed[0][2]}"
    assert proc.returncode == 0, f"{name}: the interpreter exited {proc.returncode}\n{proc.stderr}"
    runnable = [b for b in todo if b[0] != "setup"]
    assert len(results) == len(todo), f"{name}: {len(results)} of {len(todo)} blocks reported"
    missing = [r for r in results if r[0] == "missing"]
    if missing and len(missing) == len(runnable):
        pytest.skip(f"{name}: every example needs a module not installed here: "
                    f"{sorted({m for r in missing for m in r[2]})}")
