"""tink-agent-setup (registry config, pull with retry, extraction) and tink-agent-start (argv)."""

from __future__ import annotations

import base64
import json
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

GENERATOR = (Path(__file__).resolve().parents[2] / "image/mkosi.extra/usr/lib/systemd/system-generators"
             / "captainos-cmdline")

if TYPE_CHECKING:
    from tests.image.conftest import Result, Sandbox


PASSWORD = "s3cr3t-pa55"  # a test value that must never appear in logs


ELF_ARM64 = b"\x7fELF\x02\x01\x01" + bytes(11) + b"\xb7\x00" + bytes(44)  # an aarch64 ELF header


def fake_runtime(sandbox: Sandbox, *, fail_pulls: int = 0, agent_path: str = "tink-agent",
                 containerd_down: int = 0, agent_source: str = "/bin/true",
                 pull_errors: tuple[str, ...] = ("dial tcp: connection refused",),
                 fail_inspects: int = 0, fail_unpacks: int = 0) -> None:
    """nerdctl and tar fakes: containerd answers only after `containerd_down` tries; nerdctl
    pull fails `fail_pulls` times first, with the n-th of `pull_errors` (the last repeats);
    `image inspect` fails `fail_inspects` times, then lists one gzip layer, written into the
    content store under its digest, holding agent_source (copied with cp -a: a file, a
    directory or a symlink) at agent_path; tar's unpacking fails `fail_unpacks` times (a full
    /run), else the real tar runs. Both record their environment."""
    (sandbox.tmp / "pull-errors").write_text("\n".join(pull_errors) + "\n")
    blobs = sandbox.root / "var/lib/containerd/io.containerd.content.v1.content/blobs/sha256"
    sandbox.fake("nerdctl", f"""
count() {{
  local n; n=$(cat "{sandbox.tmp}/$1" 2>/dev/null || echo 0); echo $((n + 1)) >"{sandbox.tmp}/$1"; echo "$n"
}}
case "$*" in
  *" version"*)
    if [[ $(count versions) -lt {containerd_down} ]]; then exit 1; fi ;;
esac
case "$*" in
  *" pull "*)
    env | grep -E '^(DOCKER_CONFIG|HTTPS?_PROXY|NO_PROXY|https?_proxy)=' | sed 's/^/env /' >>"{sandbox.calls}"
    # The credentials as the pull sees them (the setup deletes them when it ends).
    if [[ -n ${{DOCKER_CONFIG:-}} ]]; then
      stat -c 'auth %a %n' "$DOCKER_CONFIG" "$DOCKER_CONFIG"/* >>"{sandbox.calls}"
      cp "$DOCKER_CONFIG/config.json" "{sandbox.tmp}/seen-auth.json"
    fi
    n=$(count pulls)
    if [[ $n -lt {fail_pulls} ]]; then
      errors=(); mapfile -t errors <"{sandbox.tmp}/pull-errors"
      (( n < ${{#errors[@]}} )) || n=$((${{#errors[@]}} - 1))
      echo "${{errors[$n]}}" >&2; exit 1
    fi ;;
  *" version"*) exit 0 ;;  # containerd answers
  *" image inspect "*)
    if [[ $(count inspects) -lt {fail_inspects} ]]; then echo "connection refused" >&2; exit 1; fi
    echo "time=x level=warning msg=\\"a warning on stderr is not a layer\\"" >&2
    stage="{sandbox.tmp}/layer"; rm -rf "$stage"; mkdir -p "$stage/$(dirname "{agent_path}")"
    cp -a "{agent_source}" "$stage/{agent_path}"
    tar -C "$stage" -czf "{sandbox.tmp}/layer.tgz" "{agent_path}"
    sum=$(sha256sum <"{sandbox.tmp}/layer.tgz"); sum=${{sum%% *}}
    mkdir -p "{blobs}"; mv "{sandbox.tmp}/layer.tgz" "{blobs}/$sum"
    printf 'application/vnd.oci.image.layer.v1.tar+gzip sha256:%s\\n\\n' "$sum" ;;
esac
""")
    sandbox.fake("tar", f"""
if [[ " $* " == *" --extract "* && $(cat "{sandbox.tmp}/unpacks" 2>/dev/null || echo 0) -lt {fail_unpacks} ]]; then
  echo $(( $(cat "{sandbox.tmp}/unpacks" 2>/dev/null || echo 0) + 1 )) >"{sandbox.tmp}/unpacks"
  echo "tar: tink-agent: Cannot write: No space left on device" >&2; exit 2
fi
exec /bin/tar "$@"
""")
    sandbox.fake("sleep")  # records the back-off delays without waiting


def calls(sandbox: Sandbox, prefix: str) -> list[str]:
    return [line for line in sandbox.call_lines() if line.startswith(prefix)]


def pulls(sandbox: Sandbox) -> list[str]:
    return [line for line in calls(sandbox, "nerdctl") if " pull " in line]


def test_pull_and_extract_from_tink_worker_image(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline("tink_worker_image=10.0.2.2:5000/tink-agent:v1 docker_registry=ignored.example\n")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    pull = [c for c in calls(sandbox, "nerdctl") if " pull " in c]
    assert len(pull) == 1
    assert "--namespace tinkerbell" in pull[0] and "--hosts-dir" in pull[0]
    assert pull[0].endswith("pull --quiet --unpack false 10.0.2.2:5000/tink-agent:v1")
    agent = sandbox.root / "run/captainos/tink-agent"
    assert stat.S_IMODE(agent.stat().st_mode) == 0o755
    assert agent.read_bytes() == Path("/bin/true").read_bytes()
    assert "agent binary extracted" in result.messages("info")
    assert sorted(p.name for p in (sandbox.root / "run/captainos").iterdir()) == ["tink-agent"]  # no leftovers
    nerd = calls(sandbox, "nerdctl")
    # Pulled without unpacking; the layers of this machine's manifest are read; then the image goes.
    assert "pull --quiet --unpack false 10.0.2.2:5000/tink-agent:v1" in pull[0]
    inspect = [c for c in nerd if " image inspect " in c]
    assert len(inspect) == 1 and "--hosts-dir" in inspect[0], inspect
    assert " --mode native --platform linux/amd64 " in inspect[0]
    assert inspect[0].endswith(" 10.0.2.2:5000/tink-agent:v1")
    assert nerd[-1].endswith("image rm 10.0.2.2:5000/tink-agent:v1")
    assert "removed the agent image from containerd" in result.messages("info")


def test_docker_registry_alone_names_the_default_image(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline("docker_registry=registry.local:5000")
    assert sandbox.run("tink-agent-setup").returncode == 0
    assert pulls(sandbox)[0].endswith("pull --quiet --unpack false registry.local:5000/tink-agent:latest")


@pytest.mark.parametrize("path", ["usr/bin/tink-agent", "usr/local/bin/tink-agent"])
def test_agent_found_in_other_usual_places(sandbox, path):
    fake_runtime(sandbox, agent_path=path)
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    assert (sandbox.root / "run/captainos/tink-agent").is_file()


def test_image_without_agent_fails_clearly(sandbox):
    fake_runtime(sandbox, agent_path="opt/other")
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 2
    assert result.messages("error") == ["the agent image has no tink-agent binary"]
    assert not (sandbox.root / "run/captainos/tink-agent").exists()
    assert calls(sandbox, "sleep") == []


def test_pull_retries_with_back_off_until_the_registry_answers(sandbox):
    fake_runtime(sandbox, fail_pulls=3)
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    assert len(pulls(sandbox)) == 4
    # A registry that does not answer yet may come: a warning once, then one info line a try.
    retries = [e for e in result.logs() if e["msg"] == "pull failed, retrying"]
    assert [e["attempt"] for e in retries] == ["1"]
    assert "connection refused" in retries[0]["error"]
    assert [e["attempt"] for e in result.logs() if e["msg"] == "pull failed again"] == ["2", "3"]
    assert result.messages("error") == []
    assert calls(sandbox, "sleep") == ["sleep 2", "sleep 4", "sleep 8"]


# Messages of containerd 2.2's resolver and unpacker as nerdctl 2.2.1 prints them.
@pytest.mark.parametrize(("error", "reason"), [
    ('time="x" level=fatal msg="failed to resolve reference \\"reg.local/agent:1\\": reg.local/agent:1: not found"',
     "not found"),
    ('failed to resolve reference \\"reg.local/agent:1\\": unexpected status from HEAD request to '
     'https://reg.local/v2/agent/manifests/1: 401 Unauthorized', "unauthorized"),
    ("failed to extract layer: no match for platform in manifest: not found", "no variant for this machine"),
    ("tls: failed to verify certificate: x509: certificate signed by unknown authority", "certificate"),
    ('failed to resolve reference \\"reg.lab:5000/agent:1\\": failed to do request: Head '
     '\\"https://reg.lab:5000/v2/agent/manifests/1\\": dial tcp: lookup reg.lab on 10.77.0.1:53: no such host',
     "does not resolve"),
])
def test_permanent_pull_errors_are_errors_once_per_change_and_on_the_console(sandbox, error, reason):
    fake_runtime(sandbox, fail_pulls=4, pull_errors=(error,))
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr  # it healed: the image appeared on the 5th try
    errors = [e for e in result.logs() if e["level"] == "error"]
    assert len(errors) == 1 and reason in errors[0]["msg"]
    assert errors[0]["msg"].startswith("cannot pull the agent image: ")
    assert [e["attempt"] for e in result.logs() if e["msg"] == "pull failed again"] == ["2", "3", "4"]
    console = (sandbox.tmp / "console").read_text().splitlines()
    assert len(console) == 2 and reason in console[0] and "pulled reg.local/agent:1 after 5 attempts" in console[1]


def test_a_new_reason_is_logged_again(sandbox):
    fake_runtime(sandbox, fail_pulls=3, pull_errors=("reg.local/agent:1: not found", "reg.local/agent:1: not found",
                                                      "dial tcp: connection refused"))
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    levels = [(e["level"], e["msg"]) for e in result.logs() if e["msg"].startswith(("cannot pull", "pull failed"))]
    assert levels == [("error", "cannot pull the agent image: the image does not exist on the registry (not found)"),
                      ("info", "pull failed again"), ("warning", "pull failed, retrying")]


def test_failures_after_the_pull_are_retried(sandbox):
    fake_runtime(sandbox, fail_inspects=2, fail_unpacks=1)
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    retries = [e for e in result.logs() if e["msg"] == "extracting the agent failed, retrying"]
    assert [e["attempt"] for e in retries] == ["1", "2", "3"]
    assert retries[0]["error"] == "reading the image's manifest: connection refused"
    assert "no space left on device" in retries[2]["error"].lower()
    assert calls(sandbox, "sleep") == ["sleep 2", "sleep 4", "sleep 8"]
    assert (sandbox.root / "run/captainos/tink-agent").read_bytes() == Path("/bin/true").read_bytes()
    assert sorted(p.name for p in (sandbox.root / "run/captainos").iterdir()) == ["tink-agent"]


def unusable(sandbox: Sandbox, source: Path) -> Result:
    fake_runtime(sandbox, agent_source=str(source))
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    return sandbox.run("tink-agent-setup")


def assert_refused(sandbox: Sandbox, result: Result, why: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = result.messages("error")
    assert len(errors) == 1 and why in errors[0], errors
    assert list((sandbox.root / "run/captainos").iterdir()) == []  # nothing installed, nothing left
    assert calls(sandbox, "sleep") == []  # no loop
    assert "refusing the agent image reg.local/agent:1" in (sandbox.tmp / "console").read_text()


def test_an_agent_for_another_architecture_is_refused(sandbox):
    other = sandbox.tmp / "arm64-agent"
    other.write_bytes(ELF_ARM64)
    assert_refused(sandbox, unusable(sandbox, other), "built for another architecture")


def test_a_script_is_not_an_agent(sandbox):
    script = sandbox.tmp / "script"
    script.write_text("#!/bin/sh\necho agent\n")
    assert_refused(sandbox, unusable(sandbox, script), "not a 64-bit little-endian ELF executable")


def test_a_directory_is_refused(sandbox):
    folder = sandbox.tmp / "folder"
    folder.mkdir()
    (folder / "x").write_text("x")
    assert_refused(sandbox, unusable(sandbox, folder), "a directory")


def test_a_symlink_is_looked_up_in_the_image_and_its_host_target_untouched(sandbox):
    host_file = sandbox.tmp / "shadow"
    host_file.write_text("root:*:1::::::\n")
    host_file.chmod(0o600)
    link = sandbox.tmp / "link"
    link.symlink_to(host_file)
    assert_refused(sandbox, unusable(sandbox, link), "the agent image has no tink-agent binary")
    assert stat.S_IMODE(host_file.stat().st_mode) == 0o600


def test_back_off_is_capped_and_never_gives_up(sandbox):
    fake_runtime(sandbox, fail_pulls=9)
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    assert sandbox.run("tink-agent-setup").returncode == 0
    assert calls(sandbox, "sleep") == [f"sleep {s}" for s in (2, 4, 8, 16, 32, 60, 60, 60, 60)]


def test_setup_waits_for_containerd_before_pulling(sandbox):
    fake_runtime(sandbox, containerd_down=5)
    sandbox.cmdline("tink_worker_image=reg.local/agent:1")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    assert result.messages("info").count("waiting for containerd") == 5
    assert calls(sandbox, "sleep") == [f"sleep {s}" for s in (1, 2, 4, 8, 10)]  # capped at 10 s
    lines = sandbox.call_lines()
    first_pull = next(i for i, line in enumerate(lines) if " pull " in line)
    assert [line.split()[-1] for line in lines[:first_pull] if line.startswith("nerdctl")] == ["version"] * 6


def test_a_containerd_socket_is_not_asked_again_and_a_dead_one_is_retried(sandbox):
    """containerd (Type=notify) has made its socket before the setup starts: no `nerdctl
    version` first. If containerd died since, the pull's error says so and the pull retries."""
    fake_runtime(sandbox, fail_pulls=1, pull_errors=(
        'time="x" level=fatal msg="cannot access containerd socket \\"/run/containerd/containerd.sock\\": '
        'connection refused"',))
    (sandbox.root / "run/containerd").mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sandbox.root / "run/containerd/containerd.sock"))
        sandbox.cmdline("tink_worker_image=reg.local/agent:1")
        result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    assert not [line for line in calls(sandbox, "nerdctl") if line.endswith(" version")]
    assert len(pulls(sandbox)) == 2
    [warning] = [e for e in result.logs() if e["msg"] == "pull failed, retrying"]
    assert "cannot access containerd socket" in warning["error"]
    assert "waiting for containerd" not in result.messages("info")


@pytest.mark.parametrize("cmdline", ['tink_worker_image="reg.local/tink agent:1"', "tink_worker_image=",
                                     "docker_registry=bad/host", "docker_registry=reg:99999"])
def test_a_refused_image_reference_is_said_and_nothing_is_pulled(sandbox, cmdline):
    fake_runtime(sandbox)
    sandbox.cmdline(cmdline)
    result = sandbox.run("tink-agent-setup")
    assert result.returncode != 0
    # The parse's refusal (at boot: the generator's, once), then what it means for the setup.
    refusal, consequence = result.messages("error")
    assert refusal.startswith("refusing a parameter: ")
    name = cmdline.strip('"').split("=")[0]
    assert consequence == f"no agent image: {name} was refused"
    assert pulls(sandbox) == []


def test_a_refused_image_does_not_fall_back_to_docker_registry(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline('tink_worker_image="reg.local/tink agent:1" docker_registry=reg.local')
    result = sandbox.run("tink-agent-setup")
    assert result.returncode != 0
    assert result.messages("error")[-1] == "no agent image: tink_worker_image was refused"
    assert pulls(sandbox) == []


def test_no_image_parameter_is_one_error(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline("quiet")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode != 0
    assert result.messages("error") == [
        "no agent image: neither tink_worker_image nor docker_registry is on the command line"]


def test_insecure_registries_get_hosts_toml(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline("tink_worker_image=10.0.2.2:5000/agent:1 insecure_registries=10.0.2.2:5000,bad/entry,other.local")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    hosts = (sandbox.root / "etc/containerd/certs.d/10.0.2.2:5000/hosts.toml").read_text()
    assert 'server = "https://10.0.2.2:5000"' in hosts
    assert '[host."https://10.0.2.2:5000"]' in hosts and "skip_verify = true" in hosts
    assert '[host."http://10.0.2.2:5000"]' in hosts
    assert (sandbox.root / "etc/containerd/certs.d/other.local/hosts.toml").is_file()
    assert not (sandbox.root / "etc/containerd/certs.d/bad").exists()
    assert len(result.messages("error")) == 1
    assert "--insecure-registry" in pulls(sandbox)[0]


def test_insecure_registries_glob_writes_nothing(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline("tink_worker_image=10.0.2.2:5000/agent:1 insecure_registries=*,[e]tc")
    result = sandbox.run("tink-agent-setup", timeout=10)
    assert result.returncode == 0, result.stderr
    assert not (sandbox.root / "etc/containerd/certs.d").exists()
    assert len(result.messages("error")) == 2
    assert "--insecure-registry" not in pulls(sandbox)[0]


def test_docker_registry_glob_is_refused_at_once(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline("docker_registry=sys/*/*/*/*/*/*/*/*")
    result = sandbox.run("tink-agent-setup", timeout=5)
    assert result.returncode != 0
    assert result.messages("error") == ["refusing a parameter: expected host[:port]",
                                        "no agent image: docker_registry was refused"]
    assert pulls(sandbox) == []


def test_credentials_go_to_a_private_file_for_their_registry_only(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline(f"docker_registry=reg.local:5000 registry_username=admin registry_password={PASSWORD}\n")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    auth_dir = sandbox.root / "run/captainos/registry-auth"
    # What the pull saw: a private directory and file...
    assert f"auth 700 {auth_dir}" in sandbox.call_lines()
    assert f"auth 600 {auth_dir}/config.json" in sandbox.call_lines()
    auth = json.loads((sandbox.tmp / "seen-auth.json").read_text())["auths"]["reg.local:5000"]["auth"]
    assert base64.b64decode(auth).decode() == f"admin:{PASSWORD}"
    assert f"env DOCKER_CONFIG={auth_dir}" in sandbox.call_lines()
    # ...deleted once the agent is in place.
    assert not auth_dir.exists()
    everything_visible = result.stderr + result.stdout + "\n".join(sandbox.call_lines())
    assert PASSWORD not in everything_visible
    assert "admin" not in result.stderr


def test_credentials_still_reach_the_pull_when_the_boot_parse_left_them_out(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline(f"docker_registry=reg.local:5000 registry_username=admin registry_password={PASSWORD}\n")
    generator = GENERATOR
    assert sandbox.run(generator).returncode == 0
    assert PASSWORD not in (sandbox.root / "run/captainos/cmdline.parsed").read_text()
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    auth = json.loads((sandbox.tmp / "seen-auth.json").read_text())["auths"]["reg.local:5000"]["auth"]
    assert base64.b64decode(auth).decode() == f"admin:{PASSWORD}"
    assert PASSWORD not in result.stderr + result.stdout + "\n".join(sandbox.call_lines())


def test_credentials_are_not_sent_to_another_registry(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline(f"tink_worker_image=ghcr.io/tinkerbell/tink-agent:v1 docker_registry=reg.local "
                    f"registry_username=admin registry_password={PASSWORD}")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    assert not (sandbox.root / "run/captainos/registry-auth").exists()
    assert not any(line.startswith("env DOCKER_CONFIG") for line in sandbox.call_lines())
    assert any("belong to another registry" in m for m in result.messages("warning"))
    assert PASSWORD not in result.stderr


def test_credentials_follow_the_image_host_without_docker_registry(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline(f"tink_worker_image=reg.local/agent:1 registry_username=u registry_password={PASSWORD}")
    assert sandbox.run("tink-agent-setup").returncode == 0
    assert (sandbox.tmp / "seen-auth.json").is_file()
    assert not (sandbox.root / "run/captainos/registry-auth").exists()


def test_a_password_with_a_quote_is_refused_not_changed(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline('tink_worker_image=reg.local/agent:1 registry_username=u registry_password=pa"ss word" x=1')
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr  # the pull goes on without credentials
    assert not (sandbox.tmp / "seen-auth.json").exists()
    # The parse refuses it by name (at boot: the generator, once), then the setup says what that means.
    errors = result.messages("error")
    assert len(errors) == 2 and all("double quote" in error for error in errors), errors
    assert errors[1].startswith("registry credentials refused")
    assert "ss word" not in result.stderr


def test_credentials_are_deleted_when_the_setup_fails(sandbox):
    script = sandbox.tmp / "script"
    script.write_text("#!/bin/sh\n")
    fake_runtime(sandbox, agent_source=str(script))
    sandbox.cmdline(f"tink_worker_image=reg.local/agent:1 registry_username=u registry_password={PASSWORD}")
    assert sandbox.run("tink-agent-setup").returncode == 2
    assert (sandbox.tmp / "seen-auth.json").is_file()
    assert not (sandbox.root / "run/captainos/registry-auth").exists()


def test_proxies_reach_the_pull(sandbox):
    fake_runtime(sandbox)
    sandbox.cmdline("tink_worker_image=reg.local/agent:1 HTTPS_PROXY=http://proxy.local:3128 "
                    "NO_PROXY=10.0.0.0/8,.local HTTP_PROXY=not-a-url")
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    lines = sandbox.call_lines()
    assert "env HTTPS_PROXY=http://proxy.local:3128" in lines and "env https_proxy=http://proxy.local:3128" in lines
    assert "env NO_PROXY=10.0.0.0/8,.local" in lines
    assert not any(line.startswith("env HTTP_PROXY") for line in lines)
    assert result.messages("error") == [
        "refusing a parameter: not a proxy URL (http://, https:// or socks5://[user:pass@]host[:port])"]


# --- tink-agent-start ---------------------------------------------------------------------

def fake_agent(sandbox: Sandbox) -> None:
    agent = sandbox.root / "run/captainos/tink-agent"
    agent.parent.mkdir(parents=True)
    agent.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" >"{sandbox.tmp}/argv"\nenv >"{sandbox.tmp}/env"\n')
    agent.chmod(0o755)


def agent_argv(sandbox: Sandbox) -> list[str]:
    return (sandbox.tmp / "argv").read_text().splitlines()


def test_agent_argv_from_the_command_line(sandbox):
    fake_agent(sandbox)
    sandbox.cmdline(f"grpc_authority=tink.local:42113 worker_id=52:54:00:12:34:56 tinkerbell_tls=true "
                    f"tinkerbell_insecure_tls=1 registry_password={PASSWORD} HTTP_PROXY=http://p.local:3128\n")
    result = sandbox.run("tink-agent-start")
    assert result.returncode == 0, result.stderr
    assert agent_argv(sandbox) == ["--runtime", "containerd", "--id", "52:54:00:12:34:56", "--grpc-server",
                                   "tink.local:42113", "--grpc-tls=true", "--grpc-insecure-tls=true",
                                   "--containerd-namespace", "tinkerbell"]
    env = (sandbox.tmp / "env").read_text()
    assert "HTTP_PROXY=http://p.local:3128" in env
    assert PASSWORD not in env and PASSWORD not in result.stderr


def test_agent_id_falls_back_to_hw_addr_and_tls_defaults_off(sandbox):
    fake_agent(sandbox)
    sandbox.cmdline("grpc_authority=10.0.2.2:42113 hw_addr=52:54:00:aa:bb:cc")
    result = sandbox.run("tink-agent-start")
    assert result.returncode == 0, result.stderr
    argv = agent_argv(sandbox)
    assert argv[argv.index("--id") + 1] == "52:54:00:aa:bb:cc"
    assert "--grpc-tls=false" in argv and "--grpc-insecure-tls=false" in argv
    assert result.messages("warning") == result.messages("error") == []


# Go's strconv.ParseBool (what Smee's template writes) and our yes/no/on/off, any case.
@pytest.mark.parametrize(("value", "flag"), [("1", "true"), ("t", "true"), ("T", "true"), ("TRUE", "true"),
                                             ("True", "true"), ("yes", "true"), ("On", "true"), ("0", "false"),
                                             ("f", "false"), ("F", "false"), ("FALSE", "false"), ("False", "false"),
                                             ("no", "false"), ("off", "false")])
def test_tls_switches_take_every_parsebool_spelling(sandbox, value, flag):
    fake_agent(sandbox)
    sandbox.cmdline(f"grpc_authority=t:1 worker_id=x tinkerbell_tls={value} tinkerbell_insecure_tls={value}")
    result = sandbox.run("tink-agent-start")
    assert result.returncode == 0, result.stderr
    argv = agent_argv(sandbox)
    assert f"--grpc-tls={flag}" in argv and f"--grpc-insecure-tls={flag}" in argv


@pytest.mark.parametrize("param", ["tinkerbell_tls", "tinkerbell_insecure_tls"])
@pytest.mark.parametrize("value", ["enabled", "y", "tru", "10", "yes!", "'true'"])
def test_a_tls_switch_that_is_not_a_boolean_keeps_the_agent_from_starting(sandbox, param, value):
    """Fail closed: a misspelled `tinkerbell_tls=enabled` must not become plaintext gRPC."""
    fake_agent(sandbox)
    sandbox.cmdline(f"grpc_authority=t:1 worker_id=x {param}={value}")
    result = sandbox.run("tink-agent-start")
    assert result.returncode == 2  # RestartPreventExitStatus: bad input does not heal
    assert not (sandbox.tmp / "argv").exists()
    assert result.messages("error") == ["refusing a parameter: not a boolean (true/false, 1/0, t/f, yes/no, on/off)",
                                        "invalid boolean: the agent does not start (TLS settings fail closed)"]
    console = (sandbox.tmp / "console").read_text()
    assert f"{param} is not a boolean" in console and "the agent does not start" in console


NO_ID = "no usable worker_id (or hw_addr): the server refuses an empty agent id"


@pytest.mark.parametrize(("cmdline", "errors"), [
    ("worker_id=x", ["grpc_authority must be host:port; the agent cannot reach Tinkerbell"]),
    ("grpc_authority=tink.local worker_id=x", ["refusing a parameter: expected host:port",
                                               "grpc_authority must be host:port; the agent cannot reach Tinkerbell"]),
    ("grpc_authority=tink.local:42113", [NO_ID]),
    ('grpc_authority=tink.local:42113 "worker_id=a b"', ["refusing a parameter: empty or holds a blank", NO_ID]),
])
def test_agent_refuses_to_start_without_server_or_id(sandbox, cmdline, errors):
    fake_agent(sandbox)
    sandbox.cmdline(cmdline)
    result = sandbox.run("tink-agent-start")
    assert result.returncode == 2
    assert result.messages("error") == errors
    assert not (sandbox.tmp / "argv").exists()


def test_agent_start_deletes_leftover_credentials(sandbox):
    fake_agent(sandbox)
    auth = sandbox.root / "run/captainos/registry-auth"
    auth.mkdir()
    (auth / "config.json").write_text("{}")
    sandbox.cmdline("grpc_authority=t:1 worker_id=x")
    assert sandbox.run("tink-agent-start").returncode == 0
    assert not auth.exists()


def test_agent_start_without_binary_says_setup_did_not_run(sandbox):
    sandbox.cmdline("grpc_authority=t:1 worker_id=x")
    result = sandbox.run("tink-agent-start")
    assert result.returncode == 1
    assert result.messages("error") == ["no agent binary; tink-agent-setup has not run"]


# --- registry mirrors --------------------------------------------------------------------------------

def hosts_toml(sandbox: Sandbox, registry: str) -> str:
    return (sandbox.root / "etc/containerd/certs.d" / registry / "hosts.toml").read_text()


def setup_ok(sandbox: Sandbox, cmdline: str) -> Result:
    """tink-agent-setup with the fake runtime on cmdline; it must succeed."""
    fake_runtime(sandbox)
    sandbox.cmdline(cmdline)
    result = sandbox.run("tink-agent-setup")
    assert result.returncode == 0, result.stderr
    return result


def test_registry_mirrors_become_hosts_toml_in_order(sandbox):
    result = setup_ok(sandbox, "tink_worker_image=quay.io/tinkerbell/tink-agent:v1 registry_mirrors=docker.io="
                              "https://m1.example:5000,quay.io=http://10.0.0.9:5000/quay,docker.io=https://m2.example")
    hub = hosts_toml(sandbox, "docker.io")
    assert 'server = "https://registry-1.docker.io"' in hub
    assert hub.index('[host."https://m1.example:5000"]') < hub.index('[host."https://m2.example"]')
    assert hub.count("skip_verify = false") == 2 and "skip_verify = true" not in hub  # verified, said so
    quay = hosts_toml(sandbox, "quay.io")
    assert 'server = "https://quay.io"' in quay and '[host."http://10.0.0.9:5000/quay"]' in quay
    assert 'capabilities = ["pull", "resolve"]' in quay
    assert result.messages("error") == []
    # nerdctl reads the same directory: the pull goes through the mirror.
    assert "--hosts-dir" in pulls(sandbox)[0] and str(sandbox.root / "etc/containerd/certs.d") in pulls(sandbox)[0]


def test_an_insecure_mirror_is_not_verified_and_an_insecure_registry_keeps_its_own_hosts(sandbox):
    setup_ok(sandbox, "tink_worker_image=10.0.2.2:5000/agent:1 registry_mirrors=10.0.2.2:5000=https://mirror.local:443 "
                      "insecure_registries=mirror.local:443,10.0.2.2:5000")
    text = hosts_toml(sandbox, "10.0.2.2:5000")
    mirror, own = text.index('[host."https://mirror.local:443"]'), text.index('[host."https://10.0.2.2:5000"]')
    assert mirror < own < text.index('[host."http://10.0.2.2:5000"]')
    assert text.count("skip_verify = true") == 2
    assert "skip_verify = true" in hosts_toml(sandbox, "mirror.local:443")  # pulls naming the mirror itself


def test_a_mirror_of_an_insecure_registry_is_verified_unless_listed_itself(sandbox):
    """nerdctl's --insecure-registry (given for the registry) makes containerd skip the checks of
    every hosts.toml entry that does not say otherwise: the mirror's entry says so."""
    import tomllib

    setup_ok(sandbox, "tink_worker_image=10.0.2.2:5000/agent:1 registry_mirrors=10.0.2.2:5000=https://mirror.local:443 "
                      "insecure_registries=10.0.2.2:5000")
    hosts = tomllib.loads(hosts_toml(sandbox, "10.0.2.2:5000"))["host"]
    assert list(hosts) == ["https://mirror.local:443", "https://10.0.2.2:5000", "http://10.0.2.2:5000"]
    assert hosts["https://mirror.local:443"]["skip_verify"] is False
    assert hosts["https://10.0.2.2:5000"]["skip_verify"] is True


@pytest.mark.parametrize("entry", ["docker.io", "docker.io=", "docker.io=ftp://m.example", "=https://m.example",
                                   "docker.io=https://user:pw@m.example", "bad/name=https://m.example",
                                   "docker.io=https://*", "docker.io=https://m.example/a b",
                                   'docker.io=https://m.example/a\\"b', "docker.io=https://me@corp.com:pw@m.example"])
def test_a_bad_mirror_entry_is_one_error_and_writes_nothing(sandbox, entry):
    result = setup_ok(sandbox, f'tink_worker_image=10.0.2.2:5000/agent:1 "registry_mirrors={entry}"')
    assert len(result.messages("error")) == 1, result.stderr
    assert "registry_mirrors" in result.messages("error")[0]
    assert not (sandbox.root / "etc/containerd/certs.d").exists()
    # Only the entry's position: a refused URL's password is not logged (it goes to syslog).
    assert "pw" not in result.stderr and "m.example" not in result.stderr, result.stderr
    assert result.logs()[0]["entry"] == "1"


def test_an_agent_image_not_embedded_is_pulled_even_when_the_list_exists(sandbox):
    listed = sandbox.root / "run/captainos/embedded-images"
    listed.parent.mkdir(parents=True)
    listed.write_text("10.0.2.2:1/tink-agent:v1\n")
    setup_ok(sandbox, "tink_worker_image=10.0.2.2:2/tink-agent:v1")  # same path and tag, other registry
    assert len(pulls(sandbox)) == 1


@pytest.mark.parametrize(("ref", "full"), [
    ("alpine", "docker.io/library/alpine:latest"), ("alpine:3", "docker.io/library/alpine:3"),
    ("tinkerbell/tink-agent", "docker.io/tinkerbell/tink-agent:latest"),
    ("docker.io/alpine", "docker.io/library/alpine:latest"),
    ("index.docker.io/library/alpine:3", "docker.io/library/alpine:3"),
    ("quay.io/tinkerbell/actions/image2disk:v1", "quay.io/tinkerbell/actions/image2disk:v1"),
    ("10.0.2.2:5000/a/b", "10.0.2.2:5000/a/b:latest"), ("localhost/x", "localhost/x:latest"),
    ("ghcr.io/x/y@sha256:" + "a" * 64, "ghcr.io/x/y@sha256:" + "a" * 64),
])
def test_image_names_are_written_out_as_the_build_writes_them(sandbox, ref, full):
    """lib.sh's cap_image_full and site.normalize agree (the build lists names one way, the
    setup looks them up the other)."""
    from captainos.stages import site

    result = sandbox.bash(f'cap_image_full "{ref}"')
    assert result.stdout == full == site.normalize(ref)


def test_a_mirror_for_index_docker_io_is_written_for_docker_io(sandbox):
    setup_ok(sandbox, "tink_worker_image=alpine registry_mirrors=index.docker.io=https://m.example")
    assert '[host."https://m.example"]' in hosts_toml(sandbox, "docker.io")
    assert not (sandbox.root / "etc/containerd/certs.d/index.docker.io").exists()


def test_an_embedded_agent_image_is_used_without_a_pull(sandbox):
    # import-images loaded it: the list holds its full name (the command line may be short).
    listed = sandbox.root / "run/captainos/embedded-images"
    listed.parent.mkdir(parents=True)
    listed.write_text("10.0.2.2:1/other:v1\ndocker.io/tinkerbell/tink-agent:latest\n")
    result = setup_ok(sandbox, "tink_worker_image=tinkerbell/tink-agent")
    assert pulls(sandbox) == []
    assert "the agent image is already here (embedded), not pulling it" in result.messages("info")
    assert (sandbox.root / "run/captainos/tink-agent").is_file()
    # ... and stays: the build put it there (only a pulled agent image is removed).
    assert not [c for c in calls(sandbox, "nerdctl") if " image rm " in c]


def test_an_ipv6_registry_mirror_and_agent_image_are_taken_as_written(sandbox):
    """IPv6 literals in brackets, as containerd's references and URLs write them: the agent
    image's registry, an insecure registry's hosts.toml, a mirror URL."""
    result = setup_ok(sandbox, "tink_worker_image=[fd77::1]:5000/tink-agent:v1 insecure_registries=[fd77::1]:5000 "
                               "registry_mirrors=docker.io=https://[fd77::2]:5000")
    assert result.messages("error") == []
    assert "[fd77::1]:5000/tink-agent:v1" in pulls(sandbox)[0]
    assert 'server = "https://[fd77::1]:5000"' in hosts_toml(sandbox, "[fd77::1]:5000")
    assert '[host."https://[fd77::2]:5000"]' in hosts_toml(sandbox, "docker.io")


def test_an_ipv6_grpc_authority_reaches_the_agent_as_written(sandbox):
    fake_agent(sandbox)
    sandbox.cmdline("grpc_authority=[fd77::1]:42113 worker_id=x")
    assert sandbox.run("tink-agent-start").returncode == 0
    argv = agent_argv(sandbox)
    assert argv[argv.index("--grpc-server") + 1] == "[fd77::1]:42113"
