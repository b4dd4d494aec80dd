"""The bench's results as markdown: every run side by side, the issue's targets P1..P5 as ratios, the scaling table
and (in docs/performance.md) the profile summaries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CAVEAT = (
    "Shared 2-core machine: absolute figures move with whatever else runs, so only the ratios of runs taken in one "
    "bench run count (each ratio's two runs ran back to back)."
)


def _find(results: dict[str, Any], **match: Any) -> dict[str, Any] | None:
    for run in results["runs"]:
        if "study_mb" in run or "hosts" in run or "processes" in run["name"]:
            continue
        if all(run.get(key) == value for key, value in match.items()):
            return run
    return None


def _paired(results: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The reference run of the same protocol and network that ran last before ``run``: its pair."""
    if run is None:
        return None
    found = None
    for other in results["runs"]:
        if other is run or other["name"] == run["name"]:
            return found
        if (other.get("kind"), other.get("protocol"), other.get("network")) == (
            "reference",
            run.get("protocol"),
            run.get("network"),
        ):
            found = other
    return found


def _rate(run: dict[str, Any] | None) -> float | None:
    if not run or not run.get("inst_per_s") or not run.get("verified", {}).get("ok", False):
        return None
    return float(run["inst_per_s"])


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    ra, rb = _rate(a), _rate(b)
    return ra / rb if ra is not None and rb else None


def _submit_ratio(engine: dict[str, Any] | None, ref: dict[str, Any] | None) -> float | None:
    """The engine's rate from submit to done (a broker run: the ledger's created_at) over the reference's."""
    if not engine or not engine.get("submit_to_done_seconds") or not _rate(ref) or not _rate(engine):
        return None
    return float(engine["instances"] / engine["submit_to_done_seconds"] / _rate(ref))  # type: ignore[operator]


def short_error(error: str) -> str:
    """An HTTP failure as its status and the server's own words, when the message carries them."""
    status = re.search(r"\((\d{3}) - ([^)]*)\)", error)
    details = re.search(r'Details\W+([^"\\]+)', error)
    query = re.search(r"contentType=[^ &]*", error)
    if status:
        said = f"; the server says: {details.group(1).strip().rstrip(':')}" if details else ""
        asked = f" for {query.group(0)}" if query else ""
        return f"HTTP {status.group(1)} {status.group(2)}{asked}{said}"
    return error.replace("|", "/")[:160]


def _fmt(value: float | None, unit: str = "x", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _verdict(value: float | None, ok: bool) -> str:
    return "not measured" if value is None else ("met" if ok else "**miss**")


def runs_table(results: dict[str, Any]) -> str:
    lines = [
        "| run | inst/s | MB/s | time (s) | wall (s) | CPU (s) | worker peak RSS | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        verified = run.get("verified")
        if verified is None:
            check = f"failed: {short_error(str(run.get('error', '')))}"
        else:
            kinds = f"{verified['byte_identical']} byte-identical"
            if verified["dataset_identical"]:
                kinds += f", {verified['dataset_identical']} dataset-identical"
            if verified["valid_not_identical"]:
                kinds += f", {verified['valid_not_identical']} valid re-encoded"
            check = f"{verified['verified']}/{verified['expected']} ({kinds})" + ("" if verified["ok"] else " FAILED")
        rss = run.get("peak_rss_mb", {}).get("worker")
        lines.append(
            f"| {run['name']} | {_fmt(run.get('inst_per_s'), '', 1)} | {_fmt(run.get('mb_per_s'), '', 1)} "
            f"| {_fmt(run.get('seconds'), '', 2)} | {_fmt(run.get('wall_seconds'), '', 2)} "
            f"| {_fmt(run.get('cpu_seconds'), '', 2)} | {_fmt(rss, ' MB', 0)} | {check} |"
        )
    return "\n".join(lines)


def targets_table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    for protocol in ("wado-rs", "wado-uri", "c-get", "c-move"):
        emb = _find(results, kind="trolley-tasks", protocol=protocol, network="loopback", mode="embedded")
        brk = _find(results, kind="trolley-tasks", protocol=protocol, network="loopback", mode="broker")
        ref, brk_ref = _paired(results, emb), _paired(results, brk)
        if ref is None or emb is None:
            continue
        goal = 1.0 if protocol == "c-move" else 0.9
        value = _ratio(emb, ref)
        measured = (
            f"{_fmt(value)} ({_fmt(_rate(emb), '', 0)} vs {_fmt(_rate(ref), '', 0)} inst/s; "
            f"on redis-server: {_fmt(_ratio(brk, brk_ref))}, submit to done {_fmt(_submit_ratio(brk, brk_ref))}; "
            "embedded by wall time: "
            f"{_fmt(emb['wall_inst_per_s'] / ref['inst_per_s'] if _rate(ref) else None)})"
        )
        rows.append(
            (f"P1 {protocol}: trolley-tasks / reference", f">= {goal}", measured, _verdict(value, (value or 0) >= goal))
        )
    for network, goal in (("loopback", 1.5), ("10 ms", 3.0)):
        emb = _find(results, kind="trolley-tasks", protocol="wado-rs", network=network, mode="embedded")
        dt = _find(results, kind="dicomtrolley", protocol="wado-rs", network=network)
        if emb is None or dt is None:
            continue
        value = _ratio(emb, dt)
        measured = f"{_fmt(value)} ({_fmt(_rate(emb), '', 0)} vs {_fmt(_rate(dt), '', 0)} inst/s)"
        rows.append(
            (
                f"P2 wado-rs {network}: trolley-tasks / dicomtrolley",
                f">= {goal}",
                measured,
                _verdict(value, (value or 0) >= goal),
            )
        )
    plain = _find(results, kind="trolley-tasks", protocol="wado-rs", network="loopback", mode="embedded", deid=None)
    deid = _find(results, kind="trolley-tasks", protocol="wado-rs", network="loopback", deid="basic")
    if plain is not None and deid is not None:
        value = _ratio(deid, plain)
        measured = f"{_fmt(value)} ({_fmt(_rate(deid), '', 0)} vs {_fmt(_rate(plain), '', 0)} inst/s)"
        label = "issue 14, wado-rs: --deid basic / byte-identical export"
        rows.append((label, ">= 0.8", measured, _verdict(value, (value or 0) >= 0.8)))
    uri = _find(results, kind="dicomtrolley", protocol="wado-uri", network="loopback")
    if uri is not None and not uri.get("ok"):
        rows.append(("dicomtrolley 4.1.0 wado-uri", "", f"fails: {short_error(str(uri.get('error')))}", ""))
    probe = results.get("probe")
    if probe:
        rss, per = probe["rss_mb"], probe["redis_bytes_per_instance"]
        rows.append(
            (
                f"P3 producer at {probe['expected']:,} queued instances",
                "< 200 MB RSS, < 500 B/instance in Redis",
                f"{rss:.0f} MB, {per:.0f} B/instance",
                _verdict(rss, rss < 200 and per < 500),
            )
        )
    large = next((run for run in results["runs"] if "study_mb" in run), None)
    small = _find(results, kind="trolley-tasks", protocol="wado-rs", network="loopback", mode="embedded")
    if large is not None:
        peak = large["peak_rss_mb"]["worker"]
        base = small["peak_rss_mb"]["worker"] if small else None
        per_study = results["cohort"]["bytes"] / results["cohort"]["studies"] / 1e6
        flat = f"; {base:.0f} MB with {per_study:.0f} MB studies" if base else ""
        rows.append(
            (
                f"P4 worker peak RSS, one {large['study_mb']} MB study",
                "< 150 MB, flat in study size",
                f"{peak:.0f} MB{flat}",
                _verdict(peak, peak < 150 and (base is None or peak < base * 1.25)),
            )
        )
    for protocol in ("wado-rs", "wado-uri", "c-get", "c-move"):
        brk = _find(results, kind="trolley-tasks", protocol=protocol, network="loopback", mode="broker")
        ref = _paired(results, brk)
        if ref is None or brk is None:
            continue
        n = ref["instances"]
        ref_ms, eng_ms = 1000 * ref["cpu_seconds"] / n, 1000 * brk["cpu_seconds"] / n
        extra = eng_ms - ref_ms
        rows.append(
            (
                f"P5 {protocol}: engine CPU per instance beyond the reference",
                "< 1 ms",
                f"{extra:+.2f} ms ({eng_ms:.2f} vs {ref_ms:.2f} ms; the command: "
                f"{1000 * brk['command_cpu_seconds'] / n:.2f} ms more)",
                _verdict(extra, extra < 1.0),
            )
        )
    lines = ["| | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def scaling_table(results: dict[str, Any]) -> str:
    names = [name for name in results.get("scaling", []) if isinstance(name, str)]
    runs = [run for run in results["runs"] if run["name"] in names]
    skipped = [row["skipped"] for row in results.get("scaling", []) if isinstance(row, dict) and "skipped" in row]
    if not runs and not skipped:
        return ""
    base = _rate(runs[0]) if runs else None
    lines = [
        "| WADO-RS, PACS 10 ms away | worker processes | inst/s | MB/s | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        rate = _rate(run)
        where = f"{run['hosts']} namespace host(s)" if "hosts" in run else "local (embedded)"
        lines.append(
            f"| {where} | {run['workers']} | {_fmt(rate, '', 1)} | {_fmt(run.get('mb_per_s'), '', 1)} "
            f"| {_fmt(rate / base if rate and base else None)} |"
        )
    for reason in skipped:
        lines.append(f"| namespace hosts | | skipped: {reason} | | |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    cohort = results["cohort"]
    relay = results.get("relay_check", {})
    head = (
        f"Bench of {results['date']} (size {results['size']}): {cohort['instances']:,} instances "
        f"({cohort['bytes'] / 1e6:.0f} MB) in {cohort['studies']} studies, study-level cohort CSV. "
        f"Load average {machine['load_at_start'][0]} at the start, {machine['load_at_end'][0]} at the end; the "
        f"machine's {machine['cpus']} CPUs were {machine['busy_cpu_fraction']:.0%} busy over the "
        f"{results['elapsed_seconds']:.0f} s. {CAVEAT}"
    )
    if relay:
        head += (
            f"\n\nThe PACS 10 ms away: GET /system took {relay['kept_alive_direct_ms']} ms directly and "
            f"{relay['kept_alive_relayed_ms']} ms through the relay on a kept-alive connection "
            f"({relay['new_connection_direct_ms']} and {relay['new_connection_relayed_ms']} ms on a new one)."
        )
    parts = [head, "### Targets (issue 12)", targets_table(results), "### Every run", runs_table(results)]
    scaling = scaling_table(results)
    if scaling:
        parts += ["### Scaling (issue 13)", scaling]
    return "\n\n".join(parts)


def profile_markdown(results: dict[str, Any]) -> str:
    profiles = results.get("profiles") or {}
    if not profiles:
        return ""
    parts = [
        "### Profiles (py-spy, both workers and their pool processes, separate redis-server runs)",
        "Shares are of py-spy's samples. On loopback: samples of threads py-spy saw running, with an estimate in "
        "CPU ms per instance (share x the engine CPU per instance psutil measured in the timed redis-server run of "
        "the same protocol). Ten ms away: the stacks of the running task only, idle ones included, so the shares "
        "say where a task's wall time goes.",
    ]
    for label, found in profiles.items():
        if "error" in found:
            parts.append(f"**{label}**: no profile ({found['error']}).")
            continue
        protocol = found.get("protocol", label)
        timed = _find(results, kind="trolley-tasks", protocol=protocol, network="loopback", mode="broker")
        cpu_ms = 1000 * timed["cpu_seconds"] / timed["instances"] if timed and not found.get("tasks_only") else None
        unit = "est. CPU ms/instance" if cpu_ms is not None else "task wall ms/instance"

        def value(row: dict[str, Any], cpu_ms: float | None = cpu_ms) -> str:
            return f"{row['share'] * cpu_ms:.2f}" if cpu_ms is not None else f"{row['ms_per_instance']:.2f}"

        processes = ", ".join(f"{name} {share:.0%}" for name, share in found.get("by_process", {}).items())
        parts.append(
            f"**{label}**: {found['samples']} samples at {found['rate']} Hz over {found['seconds']:.1f} s "
            f"({processes})."
            + (f" Measured engine CPU in the timed run: {cpu_ms:.2f} ms per instance." if cpu_ms is not None else "")
            + f"\n\n| top frames (self) | share | {unit} |\n|---|---|---|\n"
            + "\n".join(f"| `{row['frame']}` | {row['share']:.1%} | {value(row)} |" for row in found["self"][:8])
            + f"\n\n| trolley_tasks functions on the stack (inclusive) | share | {unit} |\n|---|---|---|\n"
            + "\n".join(
                f"| `{row['frame']}` | {row['share']:.1%} | {value(row)} |"
                for row in found["inclusive_trolley_tasks"][:10]
            )
        )
    return "\n\n".join(parts)


def update_doc(path: Path, table: str, results: dict[str, Any], begin: str, end: str) -> None:
    """Replace what lies between the markers in ``path`` with the table and the profile summaries."""
    text = path.read_text() if path.exists() else f"# Performance\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    before, rest = text.split(begin, 1)
    _, after = rest.split(end, 1)
    generated = "\n\n".join(part for part in (table, profile_markdown(results)) if part)
    path.write_text(f"{before}{begin}\n\n{generated}\n\n{end}{after}")
