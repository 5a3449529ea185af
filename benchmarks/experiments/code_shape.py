"""The shape of the code: lines per file and the longest functions, for the redesign's before/after.

    python benchmarks/code_shape.py --before af3b65f --out benchmarks/results/code_shape.json

``--before REV`` measures that commit too, in a temporary git worktree formatted with this tree's
ruff settings (so both sides count lines the same way).

Counts every ``.py`` file git tracks or would track of the package folders (``latentlm/``, ``autoencoder/``,
``diffusion/``, ``pipelines/``); a function's length is its ``def`` line to its last line, and its code
lines are those without its docstring.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("latentlm", "autoencoder", "diffusion", "pipelines")


def measure(root: Path, longest: int) -> dict:
    """Lines per package file and the longest functions of the tree at ``root``."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    files = sorted(root / p for p in listed.stdout.split() if p.endswith(".py") and (root / p).exists())
    lines, functions = {}, []
    for path in files:
        source = path.read_text()
        name = str(path.relative_to(root))
        lines[name] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                docstring = node.body[0] if ast.get_docstring(node) is not None else None
                code = length - (docstring.end_lineno - docstring.lineno + 1 if docstring else 0)
                functions.append({"function": f"{name}:{node.lineno} {node.name}", "lines": length, "code_lines": code})
    functions.sort(key=lambda f: -f["lines"])
    by_code = sorted(functions, key=lambda f: -f["code_lines"])
    return {
        "total_lines": sum(lines.values()),
        "files_over_400_lines": {k: v for k, v in lines.items() if v > 400},
        "functions_over_80_lines": sum(f["lines"] > 80 for f in functions),
        "longest_functions": functions[:longest],
        "functions_over_80_code_lines": sum(f["code_lines"] > 80 for f in functions),
        "longest_functions_by_code_lines": by_code[:longest],
        "lines_per_file": lines,
    }


def measure_commit(rev: str, longest: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True)
        try:
            shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")  # this tree's ruff settings
            subprocess.run([sys.executable, "-m", "ruff", "format", "-q", "."], cwd=tree, check=True)
            return measure(tree, longest)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--longest", type=int, default=5)
    parser.add_argument("--before", default=None, help="also measure this commit (formatted with ruff)")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    payload = {"benchmark": "code_shape", "command": "python benchmarks/code_shape.py " + " ".join(sys.argv[1:])}
    if args.before:
        payload["before_commit"] = args.before
        payload["before"] = measure_commit(args.before, args.longest)
    payload["after"] = measure(ROOT, args.longest)
    print(
        json.dumps(
            {
                k: {kk: vv for kk, vv in v.items() if kk != "lines_per_file"} if isinstance(v, dict) else v
                for k, v in payload.items()
            },
            indent=1,
        )
    )
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
