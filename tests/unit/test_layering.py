"""The floors of shared/DESIGN.md: launch/ and benchmarks/ -> align/ -> engine/ -> parallel/; imports only go down, and
omegaconf is imported by engine/config.py alone. plan/ (`herd plan`) stands beside align/ on engine/, and imports no
torch itself: it predicts from formulas, so it answers for 16,384 GPUs in seconds."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"parallel": {"engine", "align", "launch", "benchmarks", "plan"},
             "engine": {"align", "launch", "benchmarks", "plan"}, "align": {"launch", "benchmarks", "plan"},
             "plan": {"align", "launch", "benchmarks", "parallel", "torch"}}


def imports_of(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_imports_only_go_down():
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for floor, banned in FORBIDDEN.items() for path in (ROOT / floor).rglob("*.py")
                 for name in imports_of(path) if name.split(".")[0] in banned]
    assert not offenders, offenders


def test_only_config_imports_omegaconf():
    folders = ("engine", "parallel", "align", "launch", "recipe", "scaling", "curate", "plan", "benchmarks")
    users = sorted(str(p.relative_to(ROOT)) for folder in folders
                   for p in (ROOT / folder).rglob("*.py") if any(n.split(".")[0] == "omegaconf"
                                                                for n in imports_of(p)))
    assert users == ["engine/config.py"]


def test_model_knows_nothing_of_parallelism():
    for path in (ROOT / "engine" / "model").rglob("*.py"):
        assert not [n for n in imports_of(path) if n.startswith(("torch.distributed", "parallel"))], path
