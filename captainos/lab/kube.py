"""Tinkerbell's objects through the real Kubernetes API: Hardware, Template and Workflow.

A small REST client (client-certificate TLS, JSON) whose connections are opened inside the
lab's network namespace; the builders turn a workflow file and a VM into the objects an
operator would apply with kubectl.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from captainos.core.errors import CaptainError
from captainos.lab import netns, workflow

GROUP = "tinkerbell.org/v1alpha1"
NAMESPACE = "default"
FINAL = ("SUCCESS", "FAILED", "TIMEOUT")


class ApiError(CaptainError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API: {status} {message}")
        self.status = status


@dataclass(frozen=True)
class Client:
    """The lab's kube-apiserver, as its admin."""

    netns: str
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    timeout: float = 10.0

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                content_type: str = "application/json") -> Any:
        """One API call; the decoded JSON answer, or ApiError with the API's own message."""
        def call() -> tuple[int, bytes]:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self._context(), timeout=self.timeout)
            try:
                data = json.dumps(body).encode() if body is not None else None
                conn.request(method, path, body=data, headers={"Content-Type": content_type,
                                                               "Accept": "application/json"})
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        status, raw = netns.call_in(self.netns, call)
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"message": raw.decode(errors="replace")[:200]}
        if status >= 400:
            raise ApiError(status, str(doc.get("message", doc)))
        return doc

    def ready(self) -> bool:
        """The API answers and Tinkerbell's resources are served (the CRD migrations ran)."""
        try:
            found = self.request("GET", f"/apis/{GROUP}")
        except (ApiError, OSError):
            return False
        names = {r.get("name") for r in found.get("resources", [])}
        return {"hardware", "templates", "workflows"} <= names

    # --- objects -----------------------------------------------------------------------------
    @staticmethod
    def path(plural: str, name: str = "", namespace: str = NAMESPACE, group: str = GROUP) -> str:
        base = f"/apis/{group}" if "/" in group else f"/api/{group}"
        return f"{base}/namespaces/{namespace}/{plural}" + (f"/{urllib.parse.quote(name)}" if name else "")

    def create(self, plural: str, obj: Mapping[str, Any]) -> Any:
        return self.request("POST", self.path(plural, namespace=obj["metadata"].get("namespace", NAMESPACE)), obj)

    def get(self, plural: str, name: str) -> Any:
        return self.request("GET", self.path(plural, name))

    def items(self, plural: str, group: str = GROUP) -> list[dict[str, Any]]:
        return list(self.request("GET", self.path(plural, group=group)).get("items", []))

    def delete(self, plural: str, name: str) -> None:
        try:
            self.request("DELETE", self.path(plural, name))
        except ApiError as exc:
            if exc.status != 404:
                raise

    def events(self, name: str = "") -> list[dict[str, Any]]:
        """Core events of the namespace, about one object when a name is given."""
        found = self.items("events", group="v1")
        return [e for e in found if not name or e.get("involvedObject", {}).get("name") == name]


# ---------------------------------------------------------------------------------------------
# The objects


def object_name(mac: str) -> str:
    return "vm-" + mac.lower().replace(":", "-")


def hardware(name: str, *, mac: str, ip: str, netmask: str, gateway: str, hostname: str, uefi: bool,
             kernel_params: tuple[str, ...] = (), arch: str = "x86_64", osie_url: str = "",
             nameservers: tuple[str, ...] = ()) -> dict[str, Any]:
    """A Hardware for one NIC: Smee's DHCP reservation, netboot allowed, extra kernel parameters,
    and where its OSIE comes from when not from Smee's default URL."""
    osie: dict[str, Any] = {"kernelParams": list(kernel_params), **({"baseURL": osie_url} if osie_url else {})}
    return {
        "apiVersion": GROUP, "kind": "Hardware",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "interfaces": [{
                "dhcp": {"mac": mac.lower(), "hostname": hostname, "arch": arch, "uefi": uefi, "lease_time": 86400,
                         "ip": {"address": ip, "netmask": netmask, "gateway": gateway},
                         **({"name_servers": list(nameservers)} if nameservers else {})},
                "netboot": {"allowPXE": True, "allowWorkflow": True,
                            "osie": osie},
            }],
            "metadata": {"instance": {"hostname": hostname, "id": mac.lower()}},
        },
    }


def template_data(wf: workflow.Workflow, global_timeout: int = 1800) -> str:
    """The Template's YAML, shaped as Tinkerbell's template parser reads it."""
    def env(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
        return dict(pairs)

    tasks = []
    for task in wf.tasks:
        actions = []
        for action in task.actions:
            doc: dict[str, Any] = {"name": action.name, "image": action.image, "timeout": action.timeout}
            if action.command:
                doc["command"] = list(action.command)
            if action.volumes:
                doc["volumes"] = list(action.volumes)
            if action.environment:
                doc["environment"] = env(action.environment)
            if action.pid:
                doc["pid"] = action.pid
            ns = {k: v for k, v in (("network", action.network_ns), ("pid", action.pid_ns)) if v}
            if ns:
                doc["namespaces"] = ns
            actions.append(doc)
        tdoc: dict[str, Any] = {"name": task.name, "worker": task.worker, "actions": actions}
        if task.volumes:
            tdoc["volumes"] = list(task.volumes)
        if task.environment:
            tdoc["environment"] = env(task.environment)
        tasks.append(tdoc)
    doc = {"version": "0.1", "name": wf.name, "global_timeout": global_timeout, "tasks": tasks}
    return str(yaml.safe_dump(doc, sort_keys=False, width=1000))


def template(name: str, wf: workflow.Workflow) -> dict[str, Any]:
    return {"apiVersion": GROUP, "kind": "Template", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"data": template_data(wf)}}


def workflow_object(name: str, *, template_name: str, hardware_name: str, mac: str,
                    boot_mode: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"templateRef": template_name, "hardwareRef": hardware_name,
                            "hardwareMap": {"device_1": mac.lower()}}
    if boot_mode:
        spec["bootOptions"] = {"bootMode": boot_mode}
    return {"apiVersion": GROUP, "kind": "Workflow", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec}


def workflow_state(obj: Mapping[str, Any]) -> str:
    return str(obj.get("status", {}).get("state", ""))


def action_states(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(action name, state) of every action in the Workflow's status."""
    return [(a.get("name", ""), a.get("state", "")) for t in obj.get("status", {}).get("tasks", []) or []
            for a in t.get("actions", []) or []]


def conditions(obj: Mapping[str, Any]) -> dict[str, str]:
    """The Workflow's status conditions, type -> status (the controller's record of what it
    did, e.g. TemplateRenderedSuccess; v0.25.0 emits no Kubernetes events)."""
    return {str(c.get("type")): str(c.get("status")) for c in obj.get("status", {}).get("conditions", []) or []}

