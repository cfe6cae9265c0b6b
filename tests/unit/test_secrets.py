"""R17's rules (engine/secrets.py) and where they are applied: the config dump, console lines, the checkpoint
manifest and the command's error lines and tracebacks. The end-to-end proof is tests/integration/test_secrets.py."""

import dataclasses
import hashlib
import io
import json
import os
import sys
from typing import List

import pytest
import yaml

from engine.callbacks.console import ConsoleCallback
from engine.checkpoint.store import MANIFEST, CheckpointStore
from engine.config import SECRET, JobConfig, _field_type, load_config, secret_fields, to_yaml
from engine.errors import ConfigError
from engine.secrets import (REDACTED, is_secret_name, redact_env, redact_tree, scrub, scrub_tree,
                            secret_values)

TOKEN = "hf_FAKEtoken1234567890"


@pytest.mark.parametrize("name", [
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN", "OPENAI_API_KEY", "PGPASSWORD", "db_passwd", "GOOGLE_APPLICATION_CREDENTIALS", "NPM_AUTH",
    "log.apiKey", "wandb.auth.user", "MONKEY_KEY", "tokenizer_secret"])
def test_secret_looking_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "TOKENIZERS_PARALLELISM", "data.tokenizer.path", "tokens_per_s", "MAX_NEW_TOKENS", "SSH_AUTH_SOCK",
    "XAUTHORITY", "GIT_AUTHOR_NAME", "PATH", "HOME", "MASTER_ADDR", "OMP_NUM_THREADS", "HERD_FAULT"])
def test_harmless_names(name):
    assert not is_secret_name(name)


def test_secret_values_are_long_values_of_secret_names_longest_first():
    env = {"HF_TOKEN": TOKEN, "WANDB_API_KEY": TOKEN + "-more", "SHORT_TOKEN": "1234567", "PATH": "/usr/bin:/bin",
           "TOKENIZERS_PARALLELISM": "false-but-long", "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock"}
    assert secret_values(env) == [TOKEN + "-more", TOKEN]


def test_scrub_replaces_every_occurrence_and_a_longer_secret_whole(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", TOKEN + "-more")
    text = f"GET https://user:{TOKEN}@hub/x failed; retry with {TOKEN + '-more'} and {TOKEN}"
    assert scrub(text) == "GET https://user:***@hub/x failed; retry with *** and ***"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("WANDB_API_KEY")
    assert scrub(text) == text  # nothing known, nothing touched


def test_redact_tree_by_key_by_marked_path_and_by_value():
    tree = {"log": {"name": f"run-{TOKEN}", "wandb_api_key": "k-123", "empty_token": ""},
            "credentials": {"user": "me", "list": ["a", 1]},
            "data": {"tokenizer": {"path": "tok.json"}, "train": [{"path": "p", "note": "x"}]},
            "steps": 3}
    out = redact_tree(tree, marked=lambda path: path == ("data", "train", "note"), values=[TOKEN])
    assert out == {"log": {"name": "run-***", "wandb_api_key": REDACTED, "empty_token": ""},
                   "credentials": {"user": REDACTED, "list": [REDACTED, REDACTED]},
                   "data": {"tokenizer": {"path": "tok.json"}, "train": [{"path": "p", "note": REDACTED}]},
                   "steps": 3}


def test_scrub_tree_keeps_keys_and_structure():
    meta = {"step": 4, "token_budget": 7, "source": f"/data/{TOKEN}/hf", "layout": {"tp": 2}, "lrs": [0.1, 0.2]}
    assert scrub_tree(meta, [TOKEN]) == {**meta, "source": "/data/***/hf"}


def test_redact_env():
    env = {"HF_TOKEN": TOKEN, "URL": f"https://x:{TOKEN}@y", "PATH": "/bin", "EMPTY_SECRET": ""}
    assert redact_env(env) == {"HF_TOKEN": REDACTED, "URL": "https://x:***@y", "PATH": "/bin", "EMPTY_SECRET": ""}


def _leaf_paths(schema, prefix=""):
    for f in dataclasses.fields(schema):
        inner = _field_type(schema, f)
        if dataclasses.is_dataclass(inner):
            yield from _leaf_paths(inner, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_no_schema_field_holds_a_secret():
    """herd configs carry no credentials. A new field whose name looks secret would be written as *** and could
    not be read back from config.yaml: rename it, list its harmless word in engine/secrets.py, or mark it SECRET
    on purpose (and update this test)."""
    looks_secret = sorted(p for p in _leaf_paths(JobConfig) if is_secret_name(p))
    assert looks_secret == [] and secret_fields() == set(), looks_secret


@dataclasses.dataclass
class _Entry:
    url: str = dataclasses.field(default="", metadata=SECRET)
    path: str = ""


@dataclasses.dataclass
class _Section:
    entries: List[_Entry] = dataclasses.field(default_factory=list)
    inner: _Entry = dataclasses.field(default_factory=_Entry)
    plain: str = ""


def test_secret_marked_fields_are_found_under_lists_and_sections():
    assert secret_fields(_Section) == {"entries.url", "inner.url"}


def test_config_dump_unchanged_without_secrets_and_scrubbed_with_one(monkeypatch, tmp_path):
    for name in [n for n in list(os.environ) if is_secret_name(n)]:
        monkeypatch.delenv(name)
    cfg = load_config(None, [f"checkpoint.dir={tmp_path}/ck-{TOKEN}", "log.name=plain"])
    clean = to_yaml(cfg)
    assert f"ck-{TOKEN}" in clean and REDACTED not in clean
    assert yaml.safe_load(clean)["checkpoint"]["dir"] == f"{tmp_path}/ck-{TOKEN}"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    dumped = to_yaml(cfg)
    assert TOKEN not in dumped and yaml.safe_load(dumped)["checkpoint"]["dir"] == f"{tmp_path}/ck-***"
    assert dumped.replace("ck-***", f"ck-{TOKEN}") == clean  # nothing else changed


@pytest.mark.parametrize("overrides", [[f"log.hf_token={TOKEN}"], [f"wandb.api_key={TOKEN}"],
                                       [f"data.train=[{{path: p, auth_token: {TOKEN}}}]"]])
def test_unknown_secret_looking_keys_are_refused_without_echoing_the_value(overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert "unknown key" in str(info.value) and TOKEN not in str(info.value)


def test_unknown_secret_key_in_a_yaml_file_is_refused_without_echoing_the_value(tmp_path):
    (tmp_path / "c.yaml").write_text(f"log:\n  name: x\nwandb:\n  api_key: {TOKEN}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "c.yaml"))
    assert "wandb: unknown key" in str(info.value) and TOKEN not in str(info.value)


def test_checkpoint_manifest_meta_is_scrubbed_and_still_verifies(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    store = CheckpointStore(tmp_path / "ck")
    step_dir = store.begin(1)
    (step_dir / "f.bin").write_bytes(b"x")
    store.commit(1, {"f.bin": {"bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}},
                 {"step": 1, "source": f"/hf/{TOKEN}", "config": f"dir: /a/{TOKEN}\n", "loader": {"n": 3}})
    raw = (step_dir / MANIFEST).read_text()
    assert TOKEN not in raw
    meta = store.verify(1)["meta"]
    assert meta == {"step": 1, "source": "/hf/***", "config": "dir: /a/***\n", "loader": {"n": 3}}
    print(json.dumps(meta))


def test_console_lines_are_scrubbed(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", TOKEN)
    out = io.StringIO()
    console = ConsoleCallback(1, [f"run dir runs/{TOKEN}"], [f"metrics: runs/{TOKEN}/metrics.jsonl"], out)
    console._print(console.header[0])
    console._print(console.footer[0])
    assert out.getvalue() == "run dir runs/***\nmetrics: runs/***/metrics.jsonl\n"


def test_crash_traceback_is_scrubbed(monkeypatch, capsys):
    from launch.cli import _scrubbed_excepthook
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    try:
        raise RuntimeError(f"download of https://hub/x?token={TOKEN} failed")
    except RuntimeError:
        _scrubbed_excepthook(*sys.exc_info())
    err = capsys.readouterr().err
    assert "Traceback" in err and "token=*** failed" in err and TOKEN not in err
