from pathlib import Path

from captainos.core import docker
from captainos.core.run import DockerRunner, Runner, docker_run_argv


def test_builder_tag_follows_the_dockerfile_content(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM debian:trixie\n")
    first = docker.builder_tag(dockerfile)
    dockerfile.write_text("FROM debian:trixie\nRUN true\n")
    assert first.startswith("captainos-builder:") and docker.builder_tag(dockerfile) != first


def test_build_argv_with_and_without_cache(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    assert docker.build_argv("t:1", False, dockerfile) == ["docker", "build", "--tag", "t:1", "--file",
                                                           str(dockerfile), str(tmp_path)]
    assert "--no-cache" in docker.build_argv("t:1", True, dockerfile)


def test_run_argv_mounts_paths_in_place_and_passes_env():
    argv = docker_run_argv("img:1", ["make", "-j2"], env={"B": "2", "A": "1"},
                           mounts=[Path("/repo"), Path("/cache")], workdir=Path("/repo"))
    assert argv[:5] == ["docker", "run", "--rm", "--privileged", "--network=host"]
    assert argv[argv.index("-w") + 1] == "/repo"
    assert "/repo:/repo" in argv and "/cache:/cache" in argv
    assert argv.index("A=1") < argv.index("B=2")
    assert argv[-3:] == ["img:1", "make", "-j2"]


def test_docker_runner_wraps_the_same_argv():
    runner = DockerRunner(image="img:1", mounts=(Path("/repo"),))
    argv, env, cwd = runner.wrap(["mkosi", "build"], {"ARCH": "arm64"})
    assert argv[-3:] == ["img:1", "mkosi", "build"] and "ARCH=arm64" in argv and env == {}
    assert argv[argv.index("-w") + 1] == str(Path.cwd()) and cwd is None


def test_docker_runner_runs_in_the_directory_the_stage_asked_for(tmp_path):
    # make and go build run in the source tree: that is the container's working directory.
    runner = DockerRunner(image="img:1", mounts=(tmp_path,))
    argv, _, cwd = runner.wrap(["make", "olddefconfig"], {}, tmp_path / "src")
    assert argv[argv.index("-w") + 1] == str(tmp_path / "src") and cwd is None
    assert Runner().wrap(["make"], {"A": "1"}, tmp_path) == (["make"], {"A": "1"}, tmp_path)
