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
