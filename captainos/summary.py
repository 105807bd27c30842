"""`summary`: the resolved configuration, the last build of each stage, artifacts, mkosi's view."""

from __future__ import annotations

import json
import sys
from typing import Any

from captainos import __version__
from captainos.core import cache, pins
from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.stages import artifacts, pipeline


def collect(cfg: Config, with_mkosi: bool = True) -> dict[str, Any]:
    report: dict[str, Any] = {"version": __version__, "config": cfg.to_json(pipeline.options()), "stages": {},
                              "artifacts": {}}
    for stage in pipeline.names():
        try:
            entry = cache.last(cfg.cache_dir, stage, cfg.arch.value)
        except CaptainError:
            report["stages"][stage] = None
            continue
        info: dict[str, Any] = {"key": entry.key, "path": str(entry.root)}
        for name in ("kernel.json", "manifest.json"):
            if (entry.root / name).is_file():
                info[name.removesuffix(".json")] = json.loads((entry.root / name).read_text())
        report["stages"][stage] = info
    for name in artifacts.checksum_targets(cfg.out_dir, cfg.arch):
        report["artifacts"][name] = (cfg.out_dir / name).stat().st_size
    report["pins"] = {"mkosi": pins.MKOSI.version}
    if with_mkosi:
        report["mkosi"] = _mkosi_summary(cfg)
    return report


def _mkosi_summary(cfg: Config) -> str:
    from captainos.core.run import run
    from captainos.stages import image

    try:
        return run(image.summary_argv(cfg), capture=True).stdout
    except CaptainError as exc:
        return f"(mkosi summary unavailable: {exc})"


def show(report: dict[str, Any], cfg: Config) -> None:
    out = sys.stdout
    out.write(f"CaptainOS {report['version']} build configuration\n")
    for name, value in report["config"].items():
        out.write(f"  {name:<16} {value}\n")
    out.write("Last builds\n")
    for stage, info in report["stages"].items():
        out.write(f"  {stage:<16} {info['key'] if info else '(none)'}\n")
        tools = (info or {}).get("manifest", {}).get("components") if stage == "tools" else None
        for line in tool_lines(tools or {}):
            out.write(f"    {line}\n")
    out.write("Artifacts in " + str(cfg.out_dir) + "\n")
    for name, size in report["artifacts"].items():
        out.write(f"  {name:<28} {size} bytes\n")
    if report.get("mkosi"):
        out.write("mkosi summary\n" + report["mkosi"])


def tool_lines(components: dict[str, Any]) -> list[str]:
    """The tools manifest for humans: per component where it came from, per binary its digest."""
    lines = []
    for name, comp in components.items():
        origin = comp.get("module") or comp.get("url") or ""
        lines.append(f"{name} {comp.get('version', '?')} from {comp.get('source', '?')} {origin}".rstrip())
        for binary, about in comp.get("binaries", {}).items():
            lines.append(f"  {binary:<24} {about.get('sha256', '?')}  {about.get('size', '?')} bytes")
    return lines
