"""The alignment demo's task, built offline from the real corpus: complete a Python function of the standard
library. Preference is objectively checkable: Python either compiles a completion or it does not.

From every function of 3 to 12 lines in the standard library's own source (tests left out, as in `make demo`):
- SFT rows: the user gives the function's first line and module, the assistant answers with the whole function;
- preference rows: chosen = the real function (it compiles), rejected = the same lines with the body's order
  reversed and the indentation of the last line broken (it does not compile), every third row also with an edited
  response (the function with its docstring, when it has one) ranked above chosen;
- prompts for rejection sampling: first lines of held-out functions, each with the check `compile()` applies.
Files are split by module (a module is held out whole), so held-out pairs are code the models never saw.
"""

import ast
import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

EXCLUDED_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}


def compiles(source: str) -> bool:
    try:
        compile(source, "<completion>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


def functions(stdlib: Path, max_chars: int) -> Iterator[Tuple[str, str]]:
    """(module path, function source) for every short top-level or method function, in file order."""
    for path in sorted(stdlib.rglob("*.py")):
        if EXCLUDED_PARTS & set(path.relative_to(stdlib).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and 3 <= node.end_lineno - node.lineno + 1 <= 12:
                # the segment by line numbers (ast.get_source_segment re-splits the whole file on every call)
                segment = lines[node.lineno - 1:node.end_lineno]
                segment[-1] = segment[-1].encode()[:node.end_col_offset].decode(errors="replace")  # byte offsets
                segment[0] = segment[0].encode()[node.col_offset:].decode(errors="replace")
                body = "\n".join(segment)
                if len(body) <= max_chars and "\t" not in body:
                    yield str(path.relative_to(stdlib)), _dedent(body)


def _dedent(body: str) -> str:
    """A method's source as a top-level function (its first line carries no indentation in the segment)."""
    lines = body.splitlines()
    rest = [line for line in lines[1:] if line.strip()]
    indent = min((len(line) - len(line.lstrip()) for line in rest), default=4) - 4
    return "\n".join([lines[0]] + [line[indent:] if indent > 0 else line for line in lines[1:]])


def broken(body: str) -> str:
    """The body's lines in reverse order, the new last line's indentation cut to 1 space: never compiles."""
    lines = body.splitlines()
    lines = [lines[0]] + lines[1:][::-1]
    lines[-1] = " " + lines[-1].lstrip()
    return "\n".join(lines)


def _held_out(module: str, fraction: float) -> bool:
    return int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def _spread(items: List[dict], limit: int) -> List[dict]:
    """At most `limit` items taken evenly over the list (over all modules, not the first ones)."""
    return items[::max(1, len(items) // limit)][:limit]


def build(out: Path, stdlib: Path, max_chars: int = 360, held_out: float = 0.1, max_prompts: int = 128,
          max_pairs: int = 1024) -> Dict[str, int]:
    """Write sft.jsonl, sft.valid.jsonl, pref.train.jsonl (at most `max_pairs`), pref.valid.jsonl and
    prompts.jsonl (at most `max_prompts`), the capped ones spread over all modules, under `out`; row counts."""
    rows: Dict[str, List[dict]] = {"sft": [], "sft.valid": [], "pref.train": [], "pref.valid": [], "prompts": []}
    for module, body in functions(stdlib, max_chars):
        bad = broken(body)
        if not compiles(body) or compiles(bad):
            continue
        first = body.splitlines()[0]
        prompt = f"Complete this Python function from {module}:\n{first}"
        valid = _held_out(module, held_out)
        pair = {"prompt": prompt, "chosen": body, "rejected": bad}
        rows["pref.valid" if valid else "pref.train"].append(pair)
        rows["sft.valid" if valid else "sft"].append({"messages": [{"role": "user", "content": prompt},
                                                                 {"role": "assistant", "content": body}]})
        if valid:
            rows["prompts"].append({"prompt": prompt, "module": module, "first_line": first})
    rows["prompts"] = _spread(rows["prompts"], max_prompts)
    rows["pref.train"] = _spread(rows["pref.train"], max_pairs)  # the reward model and DPO train on a CPU budget
    out.mkdir(parents=True, exist_ok=True)
    for name, items in rows.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return {name: len(items) for name, items in rows.items()}


def main(argv: List[str]) -> int:
    out = Path(argv[0]) if argv else Path("data/align")
    counts = build(out, Path(sysconfig.get_paths()["stdlib"]))
    print(f"alignment demo task under {out}/: " + ", ".join(f"{n} {name} rows" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
