"""What herd reads of YAML text itself, beside OmegaConf's loader (engine/config.py): one-line messages for YAML
errors, and the numbers YAML 1.1 reads other than a person means.

OmegaConf resolves plain scalars by YAML 1.1's rules, under which `010` is the octal number 8, `0777` is 511 and
`1:30` is the base-60 number 90. A seed, step count or time written that way would be used silently as another
number, so herd refuses such plain scalars, naming the file and line (or the override), and says how to write
the intended value. Stdlib and PyYAML only.
"""

import re
from pathlib import Path
from typing import Optional

import yaml

from engine.errors import ConfigError
from engine.files import file_problem

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
OVERRIDE_FORM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")
_OCTAL = re.compile(r"[-+]?0[0-7_]+")  # YAML 1.1's octal integers
_BASE60 = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")  # YAML 1.1's sexagesimal numbers


def ambiguous_number(text: str) -> Optional[str]:
    """Why the plain scalar `text` does not mean what it looks like, or None."""
    if _OCTAL.fullmatch(text):
        digits = text.lstrip("+-").lstrip("0_") or "0"
        return (f"'{text}' is read by YAML 1.1 as the octal number {int(text.replace('_', ''), 8)}: write {digits} "
                f"for the decimal number, or quote it for a string")
    if _BASE60.fullmatch(text):
        return (f"'{text}' is read by YAML 1.1 as a base-60 number ({_sexagesimal(text)}): quote it for a string "
                f"(a time like '1:30:00'), or write the number itself")
    return None


def _sexagesimal(text: str) -> str:
    sign = -1 if text.startswith("-") else 1
    value = 0.0
    for part in text.lstrip("+-").replace("_", "").split(":"):
        value = value * 60 + float(part)
    value *= sign
    return str(int(value)) if value == int(value) else str(value)


def find_ambiguous_number(text: str) -> Optional[tuple]:
    """(dotted key, line, problem) of the first plain scalar value in the YAML `text` that YAML 1.1 reads as an
    octal or base-60 number; None when there is none (or the text is no YAML: its loader says so)."""
    try:
        return _ambiguous_in(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return None


def _ambiguous_in(root) -> Optional[tuple]:
    seen = set()  # anchors make a node appear many times: each is looked at once (a billion laughs stays cheap)
    pending = [("", root)]
    while pending:
        key, node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            pending += [(f"{key}.{k.value}" if key else str(k.value), v) for k, v in reversed(node.value)]
        elif isinstance(node, yaml.SequenceNode):
            pending += [(f"{key}[{i}]", v) for i, v in reversed(list(enumerate(node.value)))]
        elif isinstance(node, yaml.ScalarNode) and node.style is None and node.tag.endswith((":int", ":float")):
            problem = ambiguous_number(node.value)
            if problem:
                return key, node.start_mark.line + 1, problem
    return None


def check_config_text(path: Path, text: str) -> None:
    """What OmegaConf's load accepts but a config cannot be, from one reading of the file's YAML nodes: a top
    level that is no mapping (OmegaConf reads a lone `word` as {word: None}), and numbers YAML 1.1 reads other
    than they look (ConfigError naming the key and FILE:LINE)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # OmegaConf's load has said what is wrong with it
    if root is None:
        return  # empty, or comments only: no settings
    if isinstance(root, yaml.ScalarNode):
        raise ConfigError("", f"{path}: the top level must be a mapping of sections, got the single value "
                              f"'{root.value[:60]}'")
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError("", f"{path}: the top level must be a mapping of sections, got a list")
    found = _ambiguous_in(root)
    if found:
        raise ConfigError(found[0], f"{path}:{found[1]}: {found[2]}")


def yaml_error(path: Path, e: Exception) -> str:
    """'FILE:LINE:COLUMN: not valid YAML: PROBLEM', with "duplicate key 'X' (first at line N)" for that case."""
    if isinstance(e, UnicodeDecodeError):
        return f"{path}: not valid YAML: not UTF-8 text (byte {e.start})"
    if isinstance(e, IsADirectoryError):
        return f"{path}: is a directory, not a YAML file"
    mark = getattr(e, "problem_mark", None)
    problem = str(getattr(e, "problem", None) or str(e).splitlines()[0])
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    duplicate = re.fullmatch(r"found duplicate key (.*)", problem)
    if duplicate:
        first = getattr(e, "context_mark", None)
        since = f" (the mapping starts at line {first.line + 1})" if first is not None else ""
        return f"{where}: duplicate key '{duplicate.group(1)}'{since}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    since = f" ({context} at line {start.line + 1})" if context and start is not None else ""
    return f"{where}: not valid YAML: {problem}{since}"


def include_path(parent: Path, name: str) -> Path:
    """An include is relative to the including file, or else to herd's configs/; it may not climb out."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError("include", f"{parent}: '{name}' must be a relative path without '..'")
    for base in (parent.parent, CONFIGS_DIR):
        if (base / name).is_file():
            return base / name
        if file_problem(base / name) != "does not exist":  # a directory or FIFO of that name: say so
            raise ConfigError("include", f"{parent}: included file {base / name} {file_problem(base / name)}")
    raise ConfigError("include", f"{parent}: included file '{name}' not found next to it or in {CONFIGS_DIR}")


def check_override(item: str) -> None:
    """The one-line refusals OmegaConf would give unclearly, or not at all: not key=value, a list element by
    index, an empty value (OmegaConf reads it as null), a number YAML 1.1 reads otherwise (010, 1:30)."""
    if re.match(r"^[A-Za-z_][A-Za-z0-9_.]*\[\d+\]", item) or re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_]\w*)*\.\d+[.=]",
                                                                     item):
        raise ConfigError("", f"override '{item}': a list element cannot be set by its index; give the whole list "
                              f"(data.train=[{{path: a, weight: 1}}, ...]) or edit the YAML file")
    if not OVERRIDE_FORM.match(item):
        raise ConfigError("", f"override '{item}' is not of the form section.key=value")
    key, value = item.split("=", 1)
    if value.strip() == "":
        raise ConfigError(key, f"override '{item}' gives no value (write {key}=\'\' for an empty string, or "
                               f"{key}=null)")
    found = find_ambiguous_number(f"v: {value}") if not value.lstrip().startswith(("'", '"')) else None
    if found:
        raise ConfigError(key, f"override '{item}': {found[2]}")
