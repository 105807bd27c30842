"""`./build.py lab ca | up | run WORKFLOW | status | down`: the lab for people."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from captainos.core import log
from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import kube, netns, registry
from captainos.lab.lab import Lab, Provision, lab_dir
from captainos.stages import artifacts


def _start(cfg: Config, args: argparse.Namespace) -> Lab:
    iso = (cfg.out_dir / artifacts.iso_name(cfg.arch)).is_file()
    return Lab(cfg, name=args.name, auth=args.auth, iso=iso, chart=args.chart).up()


def up(cfg: Config, args: argparse.Namespace) -> None:
    lab = _start(cfg, args)
    assert lab.state is not None
    state = lab.state
    print(f"lab {state.name} is up in network namespace {state.netns} (no route out)")
    print(f"  Tinkerbell (Smee, tink server, kube-apiserver): {state.address}")
    print(f"  kubeconfig: {state.kubeconfig}")
    print(f"  kubectl:    ip netns exec {state.netns} kubectl --kubeconfig {state.kubeconfig} get hardware,workflows")
    auth = f", with credentials {state.auth_registry}" if state.auth_registry else ""
    print(f"  registry:   {state.registry}{auth}")
    print(f"  artifacts:  http://{state.address}:8080/ serves {state.artifacts}")
    if state.chart_url:
        print(f"  Helm chart's nginx: {state.chart_url}/ serves the published image ('lab run --chart')")
    print(f"  logs:       {state.root}/tinkerbell.log")
    print("next: ./build.py lab run examples/workflow.yaml; ./build.py lab down")


def run(cfg: Config, args: argparse.Namespace) -> None:
    if not args.workflow:
        raise CaptainError("'lab run' needs a workflow file", "e.g. ./build.py lab run examples/workflow.yaml")
    path = Path(args.workflow)
    if not path.is_file():
        raise CaptainError(f"workflow file {path} does not exist")
    started_here = not (lab_dir(cfg, args.name) / "lab.json").is_file()
    if started_here:
        lab = _start(cfg, args)
    else:
        lab = Lab.attach(cfg, args.name)
        # The lab serves the out/ it was started with: rebuilt since, it must still trust the CA.
        lab.check_artifacts(registry.ensure_ca(cfg.cache_dir, Runner()))
    # The VM's consoles (serial0.log: firmware and iPXE, serial1.log: the OS), its disk and the
    # Workflow object as it ended: removed after a SUCCESS, kept (and named) otherwise.
    work = Path(tempfile.mkdtemp(prefix=f"captainos-lab-{args.name}-"))
    succeeded = False
    try:
        boot = "direct" if args.ipv6 == "ipv6-only" else args.boot
        outcome = lab.provision(Provision(workflow=path, boot=boot, index=args.vm, timeout=args.timeout,
                                          osie="chart" if args.chart else "", ipv6=args.ipv6), workdir=work)
        succeeded = outcome.state == "SUCCESS"
    finally:
        if started_here:
            lab.down()
        if succeeded:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.info(f"    kept the run's consoles, disk and Workflow object in {work}")
    print(outcome.report())
    if not succeeded:
        raise CaptainError(f"workflow {outcome.name} ended {outcome.state}",
                           "the actions above show which one; the Workflow object has each action's message")


def status(cfg: Config, args: argparse.Namespace) -> None:
    lab = Lab.attach(cfg, args.name)
    assert lab.state is not None and lab.client is not None
    print(f"lab {lab.name}: namespace {lab.state.netns}, Tinkerbell at {lab.state.address}")
    for item in lab.client.items("workflows"):
        print(f"  workflow {item['metadata']['name']}: {kube.workflow_state(item) or '-'}")


def down(cfg: Config, args: argparse.Namespace) -> None:
    known = (lab_dir(cfg, args.name) / "lab.json").is_file() or netns.exists(netns.PREFIX + args.name)
    if not known:
        log.info(f"lab {args.name} is not up: nothing to do")
        return
    Lab(cfg, name=args.name).down()
    log.info(f"lab {args.name} is down")


def ca(cfg: Config, args: argparse.Namespace) -> None:
    """The lab's CA (made once, kept in the cache): the image must trust it to pull from the lab."""
    made = registry.ensure_ca(cfg.cache_dir, Runner())
    print(made.cert)
    log.info(f"next: ./build.py --extra-ca-certs {made.cert}")


def main(cfg: Config, args: argparse.Namespace) -> None:
    {"ca": ca, "up": up, "run": run, "status": status, "down": down}[args.action](cfg, args)
