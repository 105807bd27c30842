"""A Tinkerbell workflow server for tests: the two RPCs the agent calls, with the real server's rules.

Workflows come from a YAML file shaped like a Tinkerbell template (tasks with a worker, actions
with image, timeout, command, environment, volumes, pid, namespaces). The server answers the
agent the way Tinkerbell's does:

- GetAction: INVALID_ARGUMENT for an empty agent id; NOT_FOUND when no workflow has a task for
  that agent; FAILED_PRECONDITION when there is nothing to do (workflow finished, failed or
  timed out). The first pending action is served, an action already served but not finished
  is served again (what the real server does after a restart), the next one only after the
  previous reported SUCCESS. Errors other than INVALID_ARGUMENT are long-polled: the answer
  waits until the state changes or `long_poll` seconds pass (about a minute in the real one).
- ReportActionStatus: INVALID_ARGUMENT without workflow, task or action id; NOT_FOUND for an
  unknown action. A FAILED or TIMEOUT report stops the workflow.

Every served action and every report is recorded (thread-safe, JSON-dumpable). Records hold
names, ids, images and states, never environment values or commands (they may carry secrets).
The Python stubs are generated at run time from proto/workflow.proto with grpcio-tools.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import yaml

from captainos.core import cache, log
from captainos.core.errors import CaptainError

PROTO = Path(__file__).resolve().parent / "proto" / "workflow.proto"
FINAL = ("SUCCESS", "FAILED", "TIMEOUT")

# ---------------------------------------------------------------------------------------------
# The workflow file


@dataclass(frozen=True)
class Action:
    name: str
    image: str
    timeout: int
    command: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    volumes: tuple[str, ...] = ()
    pid: str = ""
    network_ns: str = ""
    pid_ns: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    worker: str
    actions: tuple[Action, ...]
    environment: tuple[tuple[str, str], ...] = ()
    volumes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workflow:
    name: str
    tasks: tuple[Task, ...]

    @property
    def id(self) -> str:
        return f"default/{self.name}"

    def steps(self) -> list[tuple[int, int, Task, Action]]:
        return [(ti, ai, task, action) for ti, task in enumerate(self.tasks) for ai, action in enumerate(task.actions)]


_PLACEHOLDER = re.compile(r"\{\{\s*\.?([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_TOP_KEYS = {"version", "name", "id", "worker", "global_timeout", "tasks"}
_TASK_KEYS = {"name", "worker", "environment", "volumes", "actions"}
_ACTION_KEYS = {"name", "image", "timeout", "command", "environment", "volumes", "pid", "namespaces"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_. -]*$")


def render(value: Any, variables: Mapping[str, str], where: str) -> Any:
    """Replace `{{ name }}` (or Tinkerbell's `{{.name}}`) in every string of a parsed document."""
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            if match.group(1) not in variables:
                known = ", ".join(sorted(variables)) or "none"
                raise CaptainError(f"{where}: unknown placeholder {match.group(0)}", f"known: {known}")
            return variables[match.group(1)]
        return _PLACEHOLDER.sub(sub, value)
    if isinstance(value, list):
        return [render(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: render(v, variables, where) for k, v in value.items()}
    return value


def _fail(where: str, message: str, hint: str | None = None) -> CaptainError:
    return CaptainError(f"{where}: {message}", hint)


def _keys(doc: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _fail(where, f"expected a mapping, got {type(doc).__name__}",
                    "quote values that start with '{{' (YAML reads them as a mapping)")
    unknown = sorted(set(map(str, doc)) - allowed)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}", f"allowed: {', '.join(sorted(allowed))}")
    return doc


def _text(doc: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = doc.get(key)
    if value is None:
        if required:
            raise _fail(where, f"missing {key!r}")
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise _fail(where, f"{key!r} must be a string, got {type(value).__name__}",
                    "quote values that start with '{{' (YAML reads them as a mapping)")
    return str(value)


def _strings(doc: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise _fail(where, f"{key!r} must be a list of strings")
    return tuple(str(v) for v in value)


def _env(doc: Mapping[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    value = doc.get("environment") or {}
    if not isinstance(value, dict):
        raise _fail(where, "'environment' must be a mapping of NAME: value")
    out = []
    for name, raw in value.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(name)):
            raise _fail(where, f"bad environment variable name {name!r}")
        if isinstance(raw, (dict, list)) or raw is None:
            raise _fail(where, f"environment {name!r} must be a scalar")
        out.append((str(name), str(raw).lower() if isinstance(raw, bool) else str(raw)))
    return tuple(out)


def _volumes(doc: Mapping[str, Any], where: str) -> tuple[str, ...]:
    vols = _strings(doc, "volumes", where)
    for vol in vols:
        parts = vol.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise _fail(where, f"bad volume {vol!r}", "use src:dst or src:dst:ro|rw")
    return vols


def _action(doc: Any, where: str) -> Action:
    doc = _keys(doc, _ACTION_KEYS, where)
    name = _text(doc, "name", where)
    timeout = doc.get("timeout")
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise _fail(where, f"action {name!r} needs a positive whole 'timeout' in seconds (got {timeout!r})",
                    "the timeout also covers the image pull")
    command = doc.get("command") or []
    if isinstance(command, str):
        raise _fail(where, "'command' must be a list (the argv), not a string", 'e.g. ["/bin/sh", "-c", "..."]')
    ns = _keys(doc.get("namespaces") or {}, {"network", "pid"}, f"{where}.namespaces")
    return Action(name=name, image=_text(doc, "image", where), timeout=timeout,
                  command=_strings(doc, "command", where), environment=_env(doc, where),
                  volumes=_volumes(doc, where), pid=_text(doc, "pid", where, required=False),
                  network_ns=_text(ns, "network", where, required=False),
                  pid_ns=_text(ns, "pid", where, required=False))


def parse(text: str, source: str = "workflow", variables: Mapping[str, str] | None = None) -> Workflow:
    """A Workflow from YAML text, or one CaptainError naming the file and the faulty place."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        hint = "quote values that start with '{{' (YAML reads them as a mapping)" if "{{" in text else None
        raise CaptainError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})", hint) from None
    doc = _keys(render(raw, variables or {}, source), _TOP_KEYS, source)
    name = _text(doc, "name", source, required=False) or _text(doc, "id", source, required=False) or "workflow"
    if not _NAME.match(name) or "/" in name:
        raise _fail(source, f"bad workflow name {name!r}")
    default_worker = _text(doc, "worker", source, required=False)
    tasks_doc = doc.get("tasks")
    if not isinstance(tasks_doc, list) or not tasks_doc:
        raise _fail(source, "'tasks' must be a non-empty list")
    tasks = []
    for ti, tdoc in enumerate(tasks_doc):
        where = f"{source}: tasks[{ti}]"
        tdoc = _keys(tdoc, _TASK_KEYS, where)
        worker = _text(tdoc, "worker", where, required=False) or default_worker
        if not worker:
            raise _fail(where, "no 'worker' (the agent id) for this task", "set 'worker' on the task or the workflow")
        actions_doc = tdoc.get("actions")
        if not isinstance(actions_doc, list) or not actions_doc:
            raise _fail(where, "'actions' must be a non-empty list")
        actions = tuple(_action(a, f"{where}.actions[{ai}]") for ai, a in enumerate(actions_doc))
        names = [a.name for a in actions]
        if len(set(names)) != len(names):
            raise _fail(where, f"duplicate action names in {names}")
        tasks.append(Task(name=_text(tdoc, "name", where), worker=worker, actions=actions,
                          environment=_env(tdoc, where), volumes=_volumes(tdoc, where)))
    return Workflow(name=name, tasks=tuple(tasks))


def load(path: Path, variables: Mapping[str, str] | None = None) -> Workflow:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CaptainError(f"cannot read workflow {path}: {exc.strerror}") from None
    return parse(text, str(path), variables)


# ---------------------------------------------------------------------------------------------
# Generated stubs

_stubs: tuple[ModuleType, ModuleType] | None = None
_stubs_lock = threading.Lock()


def protoc_argv(out: Path) -> list[str]:
    import grpc_tools

    includes = Path(grpc_tools.__file__).parent / "_proto"
    return [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{includes}",
            f"--python_out={out}", f"--grpc_python_out={out}", PROTO.name]


def stubs(cache_dir: Path) -> tuple[ModuleType, ModuleType]:
    """(workflow_pb2, workflow_pb2_grpc), generated once per proto digest and grpcio-tools version."""
    global _stubs
    with _stubs_lock:
        if _stubs is None:
            from importlib.metadata import version

            from captainos.core.run import run

            parts = {"proto": cache.sha256_file(PROTO), "grpcio-tools": version("grpcio-tools"),
                     "protobuf": version("protobuf")}

            def produce(work: Path) -> None:
                run(protoc_argv(work), cwd=PROTO.parent)

            entry = cache.cached(cache_dir, "proto", "any", parts, force=False, produce=produce)
            sys.path.insert(0, str(entry))
            _stubs = importlib.import_module("workflow_pb2"), importlib.import_module("workflow_pb2_grpc")
        return _stubs


# ---------------------------------------------------------------------------------------------
# The server


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class RpcError(Exception):
    """A gRPC status the handler answers with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Run:
    """The server-side state of one workflow."""

    workflow: Workflow
    states: list[str]  # one per step
    state: str = "PENDING"
    current: int | None = None  # index of the step last served or reported


@dataclass
class Server:
    """The workflow server. `with Server(workflows, ...) as srv:` listens on srv.port."""

    workflows: tuple[Workflow, ...]
    cache_dir: Path
    long_poll: float = 60.0
    bind: str = "0.0.0.0"
    port: int = 0
    clock: Callable[[], float] = time.monotonic
    records: list[dict[str, Any]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._runs = {wf.id: _Run(wf, ["PENDING"] * len(wf.steps())) for wf in self.workflows}
        if len(self._runs) != len(self.workflows):
            raise CaptainError("two workflows have the same name")
        self._grpc: Any = None
        self.started = self.clock()

    # --- the rules, independent of gRPC (unit-testable) ------------------------------------------
    def _record(self, kind: str, **fields: Any) -> None:
        self.records.append({"kind": kind, "time": _now(), "t": round(self.clock() - self.started, 3), **fields})
        self._cond.notify_all()

    def _find(self, agent_id: str) -> _Run:
        for wf_run in self._runs.values():
            if any(task.worker == agent_id for task in wf_run.workflow.tasks):
                return wf_run
        raise RpcError("NOT_FOUND", "no Workflows found")

    def _next(self, agent_id: str) -> tuple[_Run, int]:
        wf_run = self._find(agent_id)
        if wf_run.state not in ("PENDING", "RUNNING"):
            raise RpcError("FAILED_PRECONDITION", "Workflow not in pending or running state")
        cur = wf_run.current
        if cur is None:
            index = 0
        elif wf_run.states[cur] in ("PENDING", "RUNNING"):
            index = cur  # served but not finished: serve it again
        elif wf_run.states[cur] == "SUCCESS":
            index = cur + 1
        else:
            raise RpcError("FAILED_PRECONDITION", "current Action not in success state")
        steps = wf_run.workflow.steps()
        if index >= len(steps):
            raise RpcError("FAILED_PRECONDITION", "no more Actions")
        if steps[index][2].worker != agent_id:
            raise RpcError("NOT_FOUND", "Task not assigned to Agent")
        return wf_run, index

    def get_action(self, agent_id: str, macs: tuple[str, ...] = ()) -> dict[str, Any]:
        """The next action for agent_id as ActionResponse fields, or RpcError after the long poll."""
        if not agent_id:
            raise RpcError("INVALID_ARGUMENT", "invalid Agent ID")
        deadline = self.clock() + self.long_poll
        with self._cond:
            while True:
                try:
                    wf_run, index = self._next(agent_id)
                    break
                except RpcError:
                    left = deadline - self.clock()
                    if left <= 0:
                        raise
                    self._cond.wait(timeout=min(left, 1.0))
            ti, ai, task, action = wf_run.workflow.steps()[index]
            again = wf_run.current == index
            wf_run.current = index
            self._record("served", workflow_id=wf_run.workflow.id, agent_id=agent_id, task=task.name,
                         action=action.name, action_id=_action_id(ti, ai), image=action.image, again=again,
                         macs=list(macs))
        env = dict(task.environment) | dict(action.environment)
        pid = action.pid_ns or action.pid
        response: dict[str, Any] = {
            "workflow_id": wf_run.workflow.id, "task_id": task.name, "agent_id": agent_id,
            "action_id": _action_id(ti, ai), "name": action.name, "image": action.image,
            "timeout": action.timeout, "command": list(action.command),
            "volumes": list(task.volumes) + list(action.volumes),
            "environment": sorted(f"{k}={v}" for k, v in env.items()), "pid": pid,
        }
        if action.network_ns or action.pid_ns:
            response["namespaces"] = {"network": action.network_ns, "pid": action.pid_ns}
        return response

    def report(self, *, workflow_id: str, agent_id: str, task_id: str, action_id: str, action_name: str,
               state: str, message: str = "", duration: str = "", start: str = "", stop: str = "") -> None:
        if not workflow_id:
            raise RpcError("INVALID_ARGUMENT", "invalid workflow id")
        if not task_id:
            raise RpcError("INVALID_ARGUMENT", "invalid task id")
        if not action_id:
            raise RpcError("INVALID_ARGUMENT", "invalid action id")
        with self._cond:
            wf_run = self._runs.get(workflow_id)
            if wf_run is None:
                raise RpcError("NOT_FOUND", "workflow not found")
            for index, (ti, ai, task, _action) in enumerate(wf_run.workflow.steps()):
                if _action_id(ti, ai) == action_id and task.worker == agent_id:
                    wf_run.states[index] = state
                    wf_run.current = index
                    if state != "SUCCESS":
                        wf_run.state = state
                    elif index == len(wf_run.states) - 1:
                        wf_run.state = "SUCCESS"
                    self._record("report", workflow_id=workflow_id, agent_id=agent_id, task=task_id,
                                 action=action_name, action_id=action_id, state=state, message=message,
                                 duration=duration, start=start, stop=stop, workflow_state=wf_run.state)
                    return
            raise RpcError("NOT_FOUND", "action not found")

    def add(self, wf: Workflow) -> None:
        """Add a workflow while the server runs (as when a workflow is created after the machine booted)."""
        with self._cond:
            if wf.id in self._runs:
                raise CaptainError(f"workflow {wf.id} already exists")
            self._runs[wf.id] = _Run(wf, ["PENDING"] * len(wf.steps()))
            self.workflows = (*self.workflows, wf)
            self._cond.notify_all()

    # --- observing ------------------------------------------------------------------------------
    def state(self, workflow_id: str) -> str:
        with self._cond:
            return self._runs[workflow_id].state

    def wait_done(self, workflow_id: str, timeout: float) -> str:
        """Wait until the workflow is SUCCESS, FAILED or TIMEOUT; return that state (or the current one)."""
        deadline = self.clock() + timeout
        with self._cond:
            wf_run = self._runs[workflow_id]
            while wf_run.state not in FINAL and self.clock() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - self.clock())))
            return wf_run.state

    def wait_record(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        deadline = self.clock() + timeout
        with self._cond:
            while True:
                for rec in self.records:
                    if predicate(rec):
                        return dict(rec)
                if self.clock() >= deadline:
                    return None
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - self.clock())))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return [dict(r) for r in self.records]

    def dump(self, path: Path) -> None:
        cache.atomic_write(path, json.dumps(self.snapshot(), indent=1) + "\n")

    # --- gRPC -----------------------------------------------------------------------------------
    def start(self) -> Server:
        import grpc

        pb2, pb2_grpc = stubs(self.cache_dir)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="workflow"))
        pb2_grpc.add_WorkflowServiceServicer_to_server(_servicer(self, pb2, pb2_grpc), server)
        port = server.add_insecure_port(f"{self.bind}:{self.port}")
        if port == 0:
            raise CaptainError(f"the workflow server cannot listen on {self.bind}:{self.port}")
        self.port = port
        server.start()
        self._grpc = server
        log.info(f"    workflow server listening on {self.bind}:{port} ({len(self.workflows)} workflow(s))")
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait()
            self._grpc = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _action_id(ti: int, ai: int) -> str:
    return f"task{ti}-action{ai}"


_GO_ZERO_TIME = -62135596800  # 0001-01-01T00:00:00Z in Unix seconds


def _ts(stamp: Any) -> str:
    if stamp.seconds <= _GO_ZERO_TIME and stamp.nanos == 0:  # unset, or Go's zero time.Time
        return ""
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC).isoformat(timespec="milliseconds")


def _servicer(server: Server, pb2: ModuleType, pb2_grpc: ModuleType) -> Any:
    """The grpc servicer: translates messages to and from Server's plain calls."""
    import grpc

    class Servicer(pb2_grpc.WorkflowServiceServicer):  # type: ignore[name-defined,misc]
        def GetAction(self, request: Any, context: Any) -> Any:
            macs = tuple(n.mac for n in request.agent_attributes.network if n.mac)
            try:
                fields = server.get_action(request.agent_id, macs)
            except RpcError as err:
                context.abort(getattr(grpc.StatusCode, err.code), err.message)
            namespaces = fields.pop("namespaces", None)
            response = pb2.ActionResponse(**fields)
            if namespaces:
                response.namespaces.CopyFrom(pb2.Namespaces(**namespaces))
            return response

        def ReportActionStatus(self, request: Any, context: Any) -> Any:
            state = pb2.ActionStatusRequest.StateType.Name(request.action_state)
            try:
                server.report(workflow_id=request.workflow_id, agent_id=request.agent_id, task_id=request.task_id,
                              action_id=request.action_id, action_name=request.action_name, state=state,
                              message=request.message.message, duration=request.execution_duration,
                              start=_ts(request.execution_start), stop=_ts(request.execution_stop))
            except RpcError as err:
                context.abort(getattr(grpc.StatusCode, err.code), err.message)
            return pb2.ActionStatusResponse()

    return Servicer()
