"""The README's Python examples cannot rot: every block compiles and its imports resolve, and every
block whose inputs exist offline runs whole, against a tiny pipeline saved where the README's
quickstart writes its own (``outputs/quickstart/pipeline``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
#: calls that train or download: a block with one runs its imports only
HEAVY_CALLS = ("from_backbone", "run_stage", "train")


def loaded_paths(tree: ast.AST) -> list[str]:
    """The string arguments of the block's ``*.from_pretrained(...)`` calls."""
    return [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_pretrained"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]


def runs_whole(tree: ast.AST, folder: Path) -> bool:
    calls = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    calls |= {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    return not calls & set(HEAVY_CALLS) and all((folder / path).exists() for path in loaded_paths(tree))


@pytest.fixture
def quickstart_folder(tmp_path, monkeypatch):
    """A working directory with a tiny untrained pipeline at outputs/quickstart/pipeline (classes: the
    quickstart's foods)."""
    from latentlm.data.restaurants import FOODS
    from latentlm.testing import build_tiny_pipeline

    texts = ["The Eagle is a cheap Italian pub.", "Blue Spice is an expensive French restaurant."]
    build_tiny_pipeline(tmp_path / "outputs" / "quickstart" / "pipeline", texts, list(FOODS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 5


def test_every_readme_block_compiles_imports_and_runs_where_it_can(quickstart_folder, capsys):
    ran = []
    for index, source in enumerate(BLOCKS):
        tree = ast.parse(source, filename=f"README.md python block {index}")
        namespace: dict = {}
        if runs_whole(tree, quickstart_folder):
            exec(compile(tree, f"README.md python block {index}", "exec"), namespace)
            ran.append(index)
        else:
            imports = ast.Module(
                body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[]
            )
            exec(compile(imports, f"README.md python block {index} (imports)", "exec"), namespace)
    # the Python usage block (sampling, SamplingOptions, encode/decode, save) and the generic loader run whole
    assert len(ran) >= 3, ran
    assert (quickstart_folder / "my-pipeline" / "model_index.json").is_file()


def test_every_dotted_latentlm_name_in_the_readmes_resolves():
    import importlib

    text = (ROOT / "README.md").read_text() + (ROOT / "benchmarks" / "README.md").read_text()
    missing = []
    for name in sorted(set(re.findall(r"\blatentlm(?:\.[A-Za-z_]\w*)+", text))):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                obj = getattr(obj, attribute, None)
            if obj is None:
                missing.append(name)
            break
    assert not missing, missing
