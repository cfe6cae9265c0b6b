import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# no usage reports from huggingface_hub (TRL, transformers) during tests: CI has no network to send them to
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# How long a thread that a test started may take to finish after the test before it counts as left running: a
# hang guard for a thread that is ending (an async save committing), never a time the test is expected to take.
THREAD_END_GUARD_S = 120.0

_EXIT_STATUS = {}


@pytest.fixture(scope="session")
def stdlib_bpe(tmp_path_factory) -> Path:
    """A byte-level BPE (herd's train_bpe, with the Llama 3 special tokens) trained on a few standard-library
    packages, built here so that no test needs the demo's data/ files. Vocabulary 2048: large enough that chat
    role names such as "user" are one token."""
    import sysconfig

    from engine.data.tokenizer import train_bpe
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for pkg in ("json", "email", "http", "urllib", "logging") for p in (stdlib / pkg).glob("*.py"))
    path = tmp_path_factory.mktemp("bpe") / "stdlib-bpe.json"
    train_bpe([f.read_text(encoding="utf-8") for f in files], 2048, str(path))
    return path


def _risky(thread: threading.Thread) -> bool:
    """A thread that must not outlive the test that started it: a non-daemon thread (the interpreter waits for it
    at exit, or it is killed in the middle of its work), or one of herd's own (named herd-*: the hang watchdog,
    an async checkpoint write), which run torch's C++ code. A daemon thread still inside C++ code when the
    interpreter finalizes is ended by pthread_exit unwinding through C++ frames, and the process aborts with
    "terminate called without an active exception" (pytorch/pytorch#179291). Libraries' idle daemon threads
    (tqdm's monitor) are pure Python and harmless."""
    return not thread.daemon or thread.name.startswith("herd")


def _leftovers(before: set) -> list:
    """What a test left behind that kills or aborts the pytest process at exit: an initialized default process
    group (its gloo threads would be torn down in interpreter finalization) and risky threads still alive."""
    problems = []
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        problems.append("a torch.distributed default process group is still initialized")
        dist.destroy_process_group()  # so that the next test starts clean
    for thread in [t for t in threading.enumerate() if t.ident not in before and _risky(t)]:
        thread.join(THREAD_END_GUARD_S)
        if thread.is_alive():
            problems.append(f"thread {thread.name!r} ({'daemon' if thread.daemon else 'non-daemon'}, "
                            f"target {getattr(thread, '_target', None)!r}) is still running")
    return problems


@pytest.fixture(autouse=True)
def _no_process_group_or_thread_left():
    """Fail the test that leaves a process group initialized or a thread running (see _leftovers)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    problems = _leftovers(before)
    if problems:
        pytest.fail("the test left state that breaks the pytest process's exit: " + "; ".join(problems),
                    pytrace=False)


def pytest_sessionstart(session):
    _EXIT_STATUS["threads"] = {t.ident for t in threading.enumerate()}


def pytest_sessionfinish(session, exitstatus):
    """Module- and session-scoped fixtures are torn down by now: what they left is reported here and fails the
    run (no test owns it)."""
    problems = _leftovers(_EXIT_STATUS.get("threads", set()))
    if problems:
        sys.stderr.write("\nthe session left state that breaks the pytest process's exit: " + "; ".join(problems)
                         + "\n")
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _EXIT_STATUS["code"] = int(session.exitstatus)


def pytest_unconfigure(config):
    """End the test process with pytest's own exit status once everything is reported, skipping interpreter
    teardown. After the full suite (never after any one test file or directory alone) the teardown of the main
    process once aborted with "terminate called without an active exception" (exit 134 on a green run). Not traced
    to a cause yet, so the hard exit stays: with HERD_TEST_HARD_EXIT=0 (the normal teardown) tests/unit,
    tests/integration + tests/distributed and the whole suite each ended with pytest's own status, no abort, and the
    checks above found no test leaving a process group or a non-daemon / herd-* thread (issue 15, item 6). The one
    leftover seen was a library daemon thread (TensorBoard's writer of a fit ended by a guard), pure Python and
    harmless at exit. Those checks keep the known mechanisms out; HERD_TEST_HARD_EXIT=0 to investigate further."""
    if os.environ.get("HERD_TEST_HARD_EXIT", "1") == "1" and "code" in _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS["code"])
