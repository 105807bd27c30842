import time

import pytest

from captainos.core import log, run
from captainos.core.errors import CaptainError


def test_failure_names_the_command_and_exit_code():
    with pytest.raises(CaptainError) as err:
        run.run(["sh", "-c", "exit 3"])
    assert "exit code 3" in str(err.value) and "sh -c 'exit 3'" in str(err.value)


def test_missing_command_is_one_line_with_a_hint():
    with pytest.raises(CaptainError) as err:
        run.run(["no-such-tool-captainos"])
    assert err.value.message == "command not found: no-such-tool-captainos"
    assert "setup" in (err.value.hint or "")


def test_stdin_is_closed_and_env_is_explicit(monkeypatch):
    monkeypatch.setenv("CAPTAINOS_LEAK", "x")
    out = run.run(["sh", "-c", "cat; echo ${CAPTAINOS_LEAK:-unset} $MINE"], env={"MINE": "mine"}, capture=True)
    assert out.stdout == "unset mine\n"


def test_secrets_never_reach_the_debug_log_or_the_error(capsys):
    log.set_debug(True)
    try:
        with pytest.raises(CaptainError) as err:
            run.run(["sh", "-c", "exit 1", "hunter2"], secret=["hunter2"])
    finally:
        log.set_debug(False)
    assert "hunter2" not in capsys.readouterr().err
    assert "hunter2" not in str(err.value) and "***" in str(err.value)


def test_logged_run_keeps_full_output_and_reports_lines(tmp_path):
    seen = []
    run.run(["sh", "-c", "echo one; echo two >&2"], log_file=tmp_path / "log", on_line=seen.append)
    assert sorted(seen) == ["one", "two"]
    assert sorted((tmp_path / "log").read_text().split()) == ["one", "two"]
    with pytest.raises(CaptainError, match=r"full log: .*log"):
        run.run(["sh", "-c", "exit 2"], log_file=tmp_path / "log")


def test_poll_returns_the_first_answer_or_none_after_the_timeout():
    answers = iter([None, None, "up"])
    assert run.poll(lambda: next(answers), timeout=5, interval=0.01) == "up"
    started = time.monotonic()
    assert run.poll(lambda: None, timeout=0.3, interval=0.05) is None
    assert 0.3 <= time.monotonic() - started < 2


def test_await_ready_tells_ready_exited_and_timeout_apart(tmp_path):
    flag = tmp_path / "ready"
    server = run.spawn(["sh", "-c", f"sleep 0.3; touch {flag}; sleep 30"], tmp_path / "server.log")
    try:
        assert run.await_ready(server, flag.exists, timeout=10, interval=0.05) == "ready"
    finally:
        run.stop(server, grace=1)
    dying = run.spawn(["sh", "-c", "exit 3"], tmp_path / "dying.log")
    assert run.await_ready(dying, lambda: False, timeout=10, interval=0.05) == "exited"
    slow = run.spawn(["sleep", "30"], tmp_path / "slow.log")
    try:
        assert run.await_ready(slow, lambda: False, timeout=0.3, interval=0.05) == "timeout"
    finally:
        run.stop(slow, grace=1)


def test_pipe_feeds_bytes_and_names_what_failed():
    assert run.pipe(["tr", "a", "b"], b"aaa") == b"bbb"
    with pytest.raises(CaptainError, match="zstd failed on the blob"):
        run.pipe(["zstd", "-dc"], b"not zstd", what="the blob")


def test_spawn_masks_secrets_in_the_logged_command(tmp_path, capsys):
    log.set_debug(True)
    try:
        proc = run.spawn(["sh", "-c", "exit 0", "hunter2"], tmp_path / "x.log", secret=("hunter2",))
        proc.wait(timeout=10)
    finally:
        log.set_debug(False)
    err = capsys.readouterr().err
    assert "hunter2" not in err and "***" in err


def test_a_logged_command_that_prints_nothing_says_it_still_runs(tmp_path, monkeypatch, capsys):
    """go build and mkosi write only to their log: a line a while tells the user it works."""
    from captainos.core import run as run_module
    monkeypatch.setattr(run_module, "HEARTBEAT", 0.1)
    run_module.run(["sleep", "0.35"], log_file=tmp_path / "build.log")
    err = capsys.readouterr().err
    assert err.count("still running after") >= 2 and f"(log: {tmp_path / 'build.log'})" in err
    run_module.run(["sleep", "0.35"], log_file=tmp_path / "b.log", on_line=lambda line: None)
    assert "still running" not in capsys.readouterr().err  # it reports its own progress
    run_module.run(["true"], log_file=tmp_path / "c.log")
    import time
    time.sleep(0.25)
    assert "still running" not in capsys.readouterr().err  # the line stops with the command
