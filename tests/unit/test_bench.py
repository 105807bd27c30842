"""Smoke test of the benchmark command on a tiny image, and the cpio reader it relies on."""

import re
import subprocess

import pytest

from captainos import cli
from captainos.core.errors import CaptainError
from captainos.lab import bench
from captainos.stages import cpio


def _tiny_image(tmp_path, name="initramfs-amd64.cpio.zst", payload=b"x" * 5000):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/big").write_bytes(payload)
    (root / "etc").mkdir()
    (root / "etc/small").write_text("hello\n")
    (root / "usr/lib/firmware/vendor").mkdir(parents=True)
    (root / "usr/lib/firmware/vendor/nic.bin.xz").write_bytes(b"f" * 3000)
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "var/lib/dpkg/info/demo:amd64.list").write_text("/usr\n/usr/bin\n/usr/bin/big\n")
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    blob = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names.encode(),
                          capture_output=True, check=True).stdout
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / name).write_bytes(subprocess.run(["zstd", "-q", "-c"], input=blob, capture_output=True,
                                            check=True).stdout)
    return out / name


def test_cpio_reader_sees_names_sizes_and_data(tmp_path):
    members = {m.name: m for m in cpio.members(cpio.decompress(_tiny_image(tmp_path)))}
    assert members["usr/bin/big"].size == 5000 and members["usr/bin/big"].is_file
    assert members["etc/small"].data == b"hello\n"
    assert not members["usr/bin"].is_file


def test_cpio_reader_rejects_garbage(tmp_path):
    with pytest.raises(CaptainError, match="not a newc cpio archive"):
        list(cpio.members(b"garbage" * 40))


def test_bench_size_prints_figures_and_tables(tmp_path, capsys, monkeypatch):
    _tiny_image(tmp_path)
    monkeypatch.setenv("OUT_DIR", str(tmp_path / "out"))
    output = tmp_path / "bench.md"
    assert cli.main(["bench", "--only", "size", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "| initramfs (zstd) |" in printed and "| rootfs uncompressed |" in printed
    assert "`/usr/bin/big` | 5,000 |" in printed
    assert re.search(r"\| firmware \(/usr/lib/firmware, xz\) \| 0\.0 MB \(3,000 bytes\), 1 files, "
                     r"\d+\.\d% of the initramfs \|", printed), printed
    assert "| demo | 5,000 |" in printed  # bytes per package from dpkg's lists
    assert output.read_text() == printed.rstrip("\n") + "\n" or output.read_text().strip() == printed.strip()


def test_bench_size_reports_what_embedded_images_cost(tmp_path, capsys, monkeypatch):
    image = _tiny_image(tmp_path)
    listing = "quay.io/a/b:1 sha256:" + "1" * 64 + "\ndocker.io/library/c:2 sha256:" + "2" * 64 + "\n"
    segment = cpio.write([("usr/share/captainos/embedded/images.tar", 0o100644, b"t" * 7000),
                          ("usr/share/captainos/embedded/images.list", 0o100644, listing.encode())])
    with image.open("ab") as out:  # a site segment after the image, as site.py appends it
        out.write(subprocess.run(["zstd", "-q", "-c"], input=segment, capture_output=True, check=True).stdout)
    monkeypatch.setenv("OUT_DIR", str(tmp_path / "out"))
    assert cli.main(["bench", "--only", "size"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\| embedded images \(--embed-images\) \| 2 images, 0\.0 MB \(7,000 bytes\) archive, "
                     r"\d+\.\d% of the initramfs \(segment 2\) \|", printed), printed


def test_bench_refuses_unknown_sections_and_missing_image(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OUT_DIR", str(tmp_path / "nothing"))
    assert cli.main(["bench", "--only", "speed"]) == 1
    assert "unknown benchmark section(s): speed" in capsys.readouterr().err
    assert cli.main(["bench", "--only", "size"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_diff_archives_names_the_changed_file(tmp_path):
    first = _tiny_image(tmp_path / "a", payload=b"a" * 100)
    second = _tiny_image(tmp_path / "b", payload=b"b" * 100)
    assert bench.diff_archives(first, second) == ["usr/bin/big"]


def test_cpio_writer_round_trips_and_is_deterministic():
    entries = [("bin", 0o40755, b""), ("bin/x", 0o100755, b"abc"), ("dev/console", 0o20600, b"", (5 << 8) | 1)]
    blob = cpio.write(entries)
    assert blob == cpio.write(entries)
    found = {m.name: m for m in cpio.members(blob)}
    assert found["bin/x"].data == b"abc" and found["bin/x"].is_file
    assert set(found) == {"bin", "bin/x", "dev/console"}


def test_busybox_initramfs_holds_busybox_and_the_script(tmp_path):
    out = bench.busybox_initramfs(tmp_path / "bb.cpio.zst", "echo hello-from-test")
    found = {m.name: m for m in cpio.members(cpio.decompress(out))}
    assert b"echo hello-from-test" in found["init"].data and found["init"].mode & 0o111
    assert found["bin/busybox"].size > 100_000


def test_diff_archives_reports_mtime_only_changes(tmp_path):
    import os

    first = _tiny_image(tmp_path / "a")
    os.utime(tmp_path / "a" / "root" / "etc" / "small", (1, 1))
    root = tmp_path / "a" / "root"
    (tmp_path / "b").mkdir()
    import shutil
    import subprocess

    shutil.copytree(root, tmp_path / "b" / "root", symlinks=True)
    os.utime(tmp_path / "b" / "root" / "etc" / "small", (2, 2))
    for side in ("a", "b"):
        names = subprocess.run(["find", "."], cwd=tmp_path / side / "root", capture_output=True, text=True,
                               check=True).stdout
        blob = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tmp_path / side / "root",
                              input=names.encode(), capture_output=True, check=True).stdout
        (tmp_path / side / "x.cpio").write_bytes(blob)
    assert first.exists()
    assert bench.diff_archives(tmp_path / "a" / "x.cpio", tmp_path / "b" / "x.cpio") == ["etc/small (mtime only)"]


def test_the_boot_workflow_gets_the_analysis_task_and_still_parses(tmp_path):
    from captainos.core.config import REPO
    from captainos.lab import workflow

    out = bench.with_analysis(REPO / "examples" / "workflow.yaml", tmp_path / "wf.yaml")
    variables = {"worker_id": "52:54:00:12:34:56", "device_1": "52:54:00:12:34:56", "registry": "10.0.2.2:5000",
                 "action_image": "10.0.2.2:5000/actions/busybox:e2e"}
    parsed = workflow.load(out, variables)
    assert [t.name for t in parsed.tasks] == ["benchmark-boot-cpu", "provision", "benchmark-boot-analysis"]
    task = parsed.tasks[-1].actions[0]
    assert task.image == "10.0.2.2:5000/actions/busybox:e2e"
    assert "/:/host" in task.volumes and "seek=16384" in task.command[-1]
    for word in ("blame", "critical-chain", "plot >plot.svg", "-u systemd-networkd -o short-monotonic",
                 "cp /host/run/captainos-bench-cpu cpu",
                 "tar -cf analysis.tar blame critical-chain plot.svg network agent-setup cpu"):
        assert word in task.command[-1]
    assert task.pid_ns == "host"
    cpu = parsed.tasks[0].actions[0]
    assert cpu.pid_ns == "host" and "/proc:/host/proc" in cpu.volumes and "/run:/host/run" in cpu.volumes
    assert len(parsed.tasks[1].actions) == 3  # the original workflow is untouched


def test_the_cpu_snapshot_lists_units_and_processes_by_cpu_time(tmp_path):
    """CPU_SCRIPT run by a POSIX shell against a fake
    /host: units by CPUUsageNSec (slices and units without a value left out, the last record
    without a blank line after it too), processes by own time with their reaped children's."""
    host = tmp_path / "host"
    for pid, stat in (("1", "1 (systemd) S 0 1 1 0 -1 4194560 1 2 3 4 150 50 900 100 20 0 1 0 5 6 7"),
                      ("42", "42 (a) b) c) S 1 42 42 0 -1 4194560 1 2 3 4 300 20 0 0 20 0 1 0 5 6 7"),
                      ("7", "7 (kworker/u8:0) I 2 0 0 0 -1 69238880 0 0 0 0 5 600 0 0 20 0 1 0 5 0 0")):
        (host / "proc" / pid).mkdir(parents=True)
        (host / "proc" / pid / "stat").write_text(stat + "\n")
    (host / "proc/uptime").write_text("30.50 4.25\n")
    (host / "run").mkdir()
    (host / "usr/bin").mkdir(parents=True)
    units = ("Id=containerd.service\nCPUUsageNSec=4500000000\n\nId=system.slice\nCPUUsageNSec=90000000000\n\n"
             "CPUUsageNSec=[not set]\nId=tmp.mount\n\nId=init.scope\nCPUUsageNSec=8250000000\n")
    (host / "usr/bin/systemctl").write_text(f"#!/bin/sh\nprintf '{units}'\n")
    (host / "usr/bin/systemctl").chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chroot").write_text('#!/bin/sh\nroot=$1; shift; program=$1; shift; exec "$root$program" "$@"\n')
    (bin_dir / "chroot").chmod(0o755)
    script = bench.CPU_SCRIPT.replace("/host", str(host)).replace("cd /tmp", f"cd {tmp_path}")
    # dash: busybox's sh would run its own chroot applet, not the fake (the real boot runs
    # the script under busybox: every benchmark boot).
    subprocess.run(["sh", "-c", script], check=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert (host / "run/captainos-bench-cpu").read_text().splitlines() == [
        "uptime 30.50 s; idle (summed over CPUs) 4.25 s",
        "-- CPU seconds by unit (systemd CPUUsageNSec)",
        "    8.25 init.scope",
        "    4.50 containerd.service",
        "-- CPU seconds by process: own, reaped children, pid, name",
        "    6.05     0.00      7 kworker/u8:0",
        "    3.20     0.00     42 a) b) c",
        "    2.00    10.00      1 systemd",
    ]


def test_with_analysis_refuses_a_workflow_without_tasks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    with pytest.raises(CaptainError, match="no 'tasks' list"):
        bench.with_analysis(bad, tmp_path / "out.yaml")


def test_read_analysis_takes_the_files_of_the_tar_at_the_offset(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (bench.ANALYSIS_OFFSET + 65536))
    assert bench.read_analysis(disk) == {}  # nothing written: no files, no error
    files = tmp_path / "files"
    files.mkdir()
    (files / "blame").write_text("5.1s containerd.service\n")
    (files / "critical-chain").write_text("multi-user.target @20s\n")
    (files / "plot.svg").write_text("<svg/>")
    (files / "other").write_text("not ours")
    archive = subprocess.run(["tar", "-cf", "-", "-C", str(files), "blame", "critical-chain", "plot.svg", "other"],
                             capture_output=True, check=True).stdout
    with disk.open("r+b") as handle:
        handle.seek(bench.ANALYSIS_OFFSET)
        handle.write(archive)
    assert bench.read_analysis(disk) == {"blame": b"5.1s containerd.service\n",
                                         "critical-chain": b"multi-user.target @20s\n", "plot.svg": b"<svg/>"}


def test_the_checkout_copy_leaves_outputs_and_object_dirs_behind(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    for rel in ("build.py", "captainos/cli.py", "image/mkosi.conf", ".tools/mkosi/x", "build/amd64/kernel/obj/a.o",
                "out/vmlinuz-amd64", ".git/HEAD", "captainos/__pycache__/cli.pyc"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    monkeypatch.setattr(bench, "REPO", repo)
    copy = bench.copy_checkout(tmp_path / "copy")
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == [
        ".tools/mkosi/x", "build.py", "captainos/cli.py", "image/mkosi.conf"]


def test_option_env_gives_another_checkout_the_same_options():
    from captainos.core import config
    from captainos.stages import pipeline

    def load(env):
        return config.load(env=env, stages=pipeline.options())

    cfg = load({"PROFILES": "test", "KERNEL_SOURCE": "debian-image", "FORCE_KERNEL": "1", "ISO_MODE": "skip"})
    again = load(bench.option_env(cfg))
    assert again == cfg and again.force("kernel")
    assert load(bench.option_env(load({}))) == load({})


@pytest.mark.parametrize(("floor", "expected"), [(384, 384), (256, 256), (1024, 1024), (300, 320), (2048, None)])
def test_floor_search_finds_the_smallest_working_step(floor, expected):
    tried = []

    def works(mib: int) -> bool:
        tried.append(mib)
        return mib >= floor

    assert bench.floor_search(works, 256, 1024, 64) == expected
    assert tried[0] == 1024 and len(tried) <= 6  # the top first, then a binary search of 13 steps


def test_the_arm64_ram_floor_runs_the_harness_with_each_probes_memory(tmp_path, monkeypatch):
    # The lab netboots amd64 only: on arm64 each probe is a qemu-test harness run.
    from captainos.core import config

    cfg = config.load(env={"ARCH": "arm64", "OUT_DIR": str(tmp_path / "out")})
    seen = []

    def probe(cfg_, workdir, workflow_file, vmlinuz, initramfs, mib):
        seen.append((cfg_.arch.value, mib, workdir.name, vmlinuz.name, initramfs.name))
        if mib == 448:
            raise CaptainError("workflow w cannot run: the guest said 'Out of memory: Killed process 7 (tar)'")
        return "SUCCESS" if mib >= 384 else "TIMEOUT"

    monkeypatch.setattr(bench, "harness_probe", probe)
    report = bench.Report()
    bench.ram_floor(report, cfg, tmp_path, tmp_path / "wf.yaml", tmp_path / "vmlinuz-arm64",
                    tmp_path / "initramfs-arm64.cpio.zst", low=256, high=512)
    assert [m for _, m, *_ in seen] == [512, 384, 320]
    assert all(s[0] == "arm64" and s[2] == f"ram-{s[1]}" and s[3] == "vmlinuz-arm64" for s in seen)
    text = report.markdown(cfg)
    row = "| RAM floor (the qemu-test harness + workflow) | 384 MiB | `./build.py bench --only ram --arch arm64` |"
    assert row in text
    assert "512 MiB: SUCCESS; 384 MiB: SUCCESS; 320 MiB: TIMEOUT" in text


def test_a_probe_that_gives_up_counts_as_failed(tmp_path, monkeypatch):
    from captainos.core import config

    cfg = config.load(env={"ARCH": "arm64", "OUT_DIR": str(tmp_path / "out")})
    monkeypatch.setattr(bench, "harness_probe", lambda *a: (_ for _ in ()).throw(
        CaptainError("workflow w cannot run: the guest said 'Kernel panic - not syncing'")))
    report = bench.Report()
    bench.ram_floor(report, cfg, tmp_path, tmp_path / "wf.yaml", tmp_path / "v", tmp_path / "i", low=256, high=256)
    text = report.markdown(cfg)
    assert "fails even at 256 MiB" in text and "256 MiB: failed (workflow w cannot run" in text


def test_a_harness_probe_boots_with_that_memory_and_gives_up_on_memory_messages(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from captainos.core import config
    from captainos.lab import e2e

    made = []

    class FakeHarness:
        def __init__(self, cfg, plan, workdir):
            made.append((cfg, plan, workdir))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def run(self):
            return SimpleNamespace(state="SUCCESS")

    monkeypatch.setattr(e2e, "Harness", FakeHarness)
    cfg = config.load(env={"ARCH": "arm64"})
    state = bench.harness_probe(cfg, tmp_path / "ram-384", tmp_path / "wf.yaml", tmp_path / "v", tmp_path / "i", 384)
    assert state == "SUCCESS"
    probe_cfg, plan, workdir = made[0]
    assert probe_cfg.qemu_mem == "384M" and probe_cfg.arch == cfg.arch and workdir == tmp_path / "ram-384"
    assert plan.kernel == tmp_path / "v" and plan.initrd == tmp_path / "i"
    assert set(bench.RAM_GIVE_UP) <= set(plan.fail_patterns)
    assert r"Dependency failed for tink-agent\.service" in plan.fail_patterns


class LabStandIn:
    """The lab's context-manager shape; a test's subclass says what provision() returns."""

    def __init__(self, cfg, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_fleet_runs_each_size_at_once_and_reports_every_machine(tmp_path, monkeypatch):
    """N provisions at once per size, each its own VM number at the RAM floor; a machine that
    fails or raises is a report line and a failure, the others still count."""
    import threading
    from pathlib import Path

    from captainos.core.config import Config
    from captainos.lab import lab as lab_module
    from tests.unit.test_lab import outcome

    running, peak, plans = [0], [0], []
    lock = threading.Lock()

    class FakeLab(LabStandIn):
        def accel(self):
            plans.append("accel")  # the KVM probe: before any clock starts

        def provision(self, plan, workdir):
            import time
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                plans.append(plan)
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            if plan.index == 3:
                raise CaptainError("QEMU exited with code 1 before the workflow ended")
            state = "TIMEOUT" if plan.index == 2 else "SUCCESS"
            return outcome(index=plan.index, state=state,
                           timeline=[("agent started", 40.0), ("first action started", 41.0), ("workflow done", 50.0)])

    monkeypatch.setattr(lab_module, "Lab", FakeLab)
    report = bench.Report()
    failed = bench.fleet(report, Config(cache_dir=tmp_path), tmp_path, Path("w.yaml"), sizes=(1, 4))
    assert plans[0] == "accel" and "accel" not in plans[1:]
    plans = plans[1:]
    assert peak[0] == 4 and sorted(p.index for p in plans) == [1, 1, 2, 3, 4]
    assert {p.mem for p in plans} == {bench.FLEET_MEM} and {p.boot for p in plans} == {"uefi"}
    assert failed == ["fleet of 4, machine 2: TIMEOUT",
                      "fleet of 4, machine 3: QEMU exited with code 1 before the workflow ended"]
    text = report.markdown(Config(cache_dir=tmp_path))
    assert "| fleet of 4: all done |" in text and "(2/4 SUCCESS)" in text and "(1/1 SUCCESS)" in text
    assert "SUCCESS: agent started 40 s, first action started 41 s, workflow done 50 s" in text


def test_nics_boots_each_nic_setup_in_turn_and_reports_medians(tmp_path, monkeypatch):
    """One NIC, a second on a network with its own DHCP server, a second whose DHCP is never
    answered: each setup a provision of its own (UEFI), one at a time, medians per setup."""
    from pathlib import Path

    from captainos.core.config import Config
    from captainos.lab import lab as lab_module
    from tests.unit.test_lab import outcome

    plans = []

    class FakeLab(LabStandIn):
        def provision(self, plan, workdir):
            plans.append(plan)
            agent = {"": 40.0, "dhcp": 41.0, "silent": 42.0}[plan.other_network] + plan.index
            return outcome(index=plan.index, state="SUCCESS", timeline=[("agent started", agent)])

    monkeypatch.setattr(lab_module, "Lab", FakeLab)
    report = bench.Report()
    bench.nics(report, Config(cache_dir=tmp_path), 2, tmp_path, Path("w.yaml"))
    assert [p.other_network for p in plans] == ["", "dhcp", "silent"] * 2 and {p.boot for p in plans} == {"uefi"}
    text = report.markdown(Config(cache_dir=tmp_path))
    assert "| one NIC: agent started (median of 2) | 41.5 s |" in text
    assert "| a second NIC, no DHCP answer: agent started (median of 2) | 43.5 s |" in text
