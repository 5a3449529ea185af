"""The shape of the code: lines per file and the longest functions, for the redesign's before/after.

    python benchmarks/code_shape.py --out benchmarks/results/code_shape_after.json

Counts every ``.py`` file git tracks or would track of the package folders (``latentlm/``, ``autoencoder/``,
``diffusion/``, ``pipelines/``); a function's length is its ``def`` line to its last line.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("latentlm", "autoencoder", "diffusion", "pipelines")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--longest", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    files = sorted(ROOT / p for p in tracked.stdout.split() if p.endswith(".py") and (ROOT / p).exists())
    lines, functions = {}, []
    for path in files:
        source = path.read_text()
        name = str(path.relative_to(ROOT))
        lines[name] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append(
                    {"function": f"{name}:{node.lineno} {node.name}", "lines": node.end_lineno - node.lineno + 1}
                )
    functions.sort(key=lambda f: -f["lines"])
    payload = {
        "benchmark": "code_shape",
        "command": "python benchmarks/code_shape.py " + " ".join(sys.argv[1:]),
        "total_lines": sum(lines.values()),
        "files_over_400_lines": {k: v for k, v in lines.items() if v > 400},
        "functions_over_80_lines": sum(f["lines"] > 80 for f in functions),
        "longest_functions": functions[: args.longest],
        "lines_per_file": lines,
    }
    print(json.dumps({k: v for k, v in payload.items() if k != "lines_per_file"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
