"""The CLI through typer's CliRunner: help texts, one-line errors with exit code 2, logging, embedded Redis.

The real subprocess runs (embedded export, Ctrl-C, search feeding export) are in test_cli_embedded.py.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from trolley_tasks.cli import COMMANDS, app, progress
from trolley_tasks.cli.logs import LOGGER_NAME, scrub, setup_logging
from trolley_tasks.cli.search import Filters
from trolley_tasks.cli.services import is_loopback
from trolley_tasks.core import QueryLevels
from trolley_tasks.engine.embedded import EmbeddedError, EmbeddedRedis, _answers, socket_path_for
from trolley_tasks.engine.models import Failure, JobState, JobStatus, SeriesProgress

runner = CliRunner()

CONFIG = """
[sources.pacs]
searcher = "qido-rs"
downloader = "wado-rs"
url = "http://127.0.0.1:9/dicom-web"

[sources.locked]
url = "http://127.0.0.1:9/dicom-web"
[sources.locked.auth]
type = "basic"
username = "trolley"
password_env = "TT_CLI_TEST_PASSWORD"
"""


@pytest.fixture(autouse=True)
def fresh_trolley_logger() -> Iterator[None]:
    """Each test starts without the handler an earlier invocation left on CliRunner's (now closed) stderr."""
    yield
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "trolley.toml"
    path.write_text(CONFIG)
    return path


def one_error_line(result: object) -> str:
    """The single line a refused command prints on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # type: ignore[attr-defined]
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_an_example_and_config_option(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert "trolley-tasks " in result.output.split("Example:")[1]
    assert "--config" in result.output and "--log-level" in result.output and "--log-json" in result.output


def test_global_options_work_before_the_command_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--config", str(tmp_path / "nope.toml"), "search", "--source", "pacs"])
    assert result.exit_code == 2
    assert "nope.toml: no such configuration file" in one_error_line(result)


def test_global_options_after_the_command_name_win(config: Path, tmp_path: Path) -> None:
    args = ["--config", str(tmp_path / "nope.toml"), "search", "--source", "elsewhere", "--config", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "no [sources.elsewhere]" in one_error_line(result)


def test_log_options_before_the_command_name_configure_logging(tmp_path: Path) -> None:
    args = ["--log-level", "debug", "--log-json", "search", "--source", "pacs", "--config", str(tmp_path / "no.toml")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [r["level"] for r in records if r["message"].startswith("refused: ")] == ["debug"]


@pytest.mark.parametrize("before", [True, False])
def test_bad_log_level_is_refused_in_either_position(config: Path, before: bool) -> None:
    option = ["--log-level", "loud"]
    command = ["jobs", "--config", str(config)]
    result = runner.invoke(app, [*option, *command] if before else [*command, *option])
    assert result.exit_code == 2
    assert "--log-level must be one of debug, info, warning, error, not 'loud'" in one_error_line(result)


def test_missing_config_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", "--source", "pacs", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "nope.toml: no such configuration file" in one_error_line(result)


def test_unknown_source(config: Path) -> None:
    result = runner.invoke(app, ["search", "--source", "elsewhere", "--config", str(config)])
    assert result.exit_code == 2
    assert "no [sources.elsewhere] (known sources: locked, pacs)" in one_error_line(result)


def test_missing_secret_env_var(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TT_CLI_TEST_PASSWORD", raising=False)
    result = runner.invoke(app, ["search", "--source", "locked", "--config", str(config)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "[sources.locked.auth] password_env" in line and "TT_CLI_TEST_PASSWORD is not set" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study-uid", "1.2.abc"], "--study-uid"),
        (["--date-from", "2024-13-01"], "--date-from '2024-13-01' is not a date"),
        (["--date-from", "2024-02-01", "--date-to", "2024-01-01"], "min_study_date is after max_study_date"),
    ],
)
def test_bad_filters_are_refused_before_the_pacs_is_asked(config: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["search", "--source", "pacs", "--config", str(config), *args])
    assert result.exit_code == 2
    assert message in one_error_line(result)


def test_unknown_config_key_names_file_section_and_key(tmp_path: Path) -> None:
    path = tmp_path / "trolley.toml"
    path.write_text(CONFIG.replace('searcher = "qido-rs"', 'sercher = "qido-rs"'))
    result = runner.invoke(app, ["search", "--source", "pacs", "--config", str(path)])
    assert result.exit_code == 2
    assert f"{path}: [sources.pacs] unknown key 'sercher'" in one_error_line(result)


def test_worker_and_flower_need_a_broker(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TROLLEY_BROKER__URL", raising=False)
    for command in ("worker", "flower"):
        result = runner.invoke(app, [command, "--config", str(config)])
        assert result.exit_code == 2
        assert f"'{command}' needs a broker" in one_error_line(result)


def test_flower_refuses_a_public_address_without_a_password(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROLLEY_BROKER__URL", "redis://127.0.0.1:9/0")
    monkeypatch.delenv("FLOWER_PASSWORD", raising=False)
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    result = runner.invoke(app, ["flower", "--address", "0.0.0.0", "--config", str(config)])
    assert result.exit_code == 2
    assert "refusing to serve Flower on 0.0.0.0 without a password" in one_error_line(result)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("10.0.0.1")


def test_filters_make_one_query_per_study_uid_and_fill_a_lone_date_bound() -> None:
    queries = Filters(study_uids=("1.2.3", "1.2.4"), modality="CT").queries(QueryLevels.SERIES)
    assert [q.StudyInstanceUID for q in queries] == ["1.2.3", "1.2.4"]
    assert all(q.ModalitiesInStudy == "CT" and q.query_level is QueryLevels.SERIES for q in queries)
    (only_from,) = Filters(date_from="2024-01-05").queries()
    assert only_from.min_study_date is not None and only_from.min_study_date.year == 2024
    assert only_from.max_study_date is not None and only_from.max_study_date >= only_from.min_study_date
    (only_to,) = Filters(date_to="2024-01-05").queries()
    assert only_to.min_study_date is not None and only_to.min_study_date.year == 1900


def test_logs_are_scrubbed_and_cut() -> None:
    assert scrub("GET http://bob:hunter2@pacs/x") == "GET http://***@pacs/x"
    assert "hunter2" not in scrub("headers={'Authorization': 'Basic aHVudGVyMg=='}")
    assert "hunter2" not in scrub("password=hunter2&user=bob")
    assert len(scrub("x" * 10_000)) < 2100
    # query strings carry patient data (urllib3 logs request lines at DEBUG); ordinary questions are left alone
    line = '"GET /dicom-web/studies?PatientID=PAT123&includefield=00100010 HTTP/1.1" 200 None'
    assert "PAT123" not in scrub(line) and "/dicom-web/studies?***" in scrub(line)
    assert "PAT123" not in scrub("from http://pacs:8042/dicom-web/studies?PatientID=PAT123")
    assert scrub("is the PACS up? yes") == "is the PACS up? yes"
    # pydicom's validation messages name the value
    assert scrub("Invalid value for VR DA: '1961-07-14'.") == "Invalid value for VR DA: ***."
    assert scrub(
        "x.py:440: UserWarning: Invalid value for VR CS: 'ct'. Please see <https://dicom.nema.org/x>\n  w()"
    ) == ("x.py:440: UserWarning: Invalid value for VR CS: ***. Please see <https://dicom.nema.org/x>\n  w()")
    assert scrub('Value "1.5x" is not valid for elements with a VR of IS') == (
        "Value *** is not valid for elements with a VR of IS"
    )
    stream = io.StringIO()
    setup_logging("info", as_json=True, stream=stream)
    logging.getLogger("trolley.test").info("fetched %s from %s", "1.2.3", "http://u:secret@h/dicom-web")
    entry = json.loads(stream.getvalue().splitlines()[-1])
    assert entry["logger"] == "trolley.test" and entry["level"] == "info"
    assert "secret" not in entry["message"] and "1.2.3" in entry["message"]
    logging.getLogger("trolley.test").debug("not shown at info")
    assert "not shown" not in stream.getvalue()


def test_embedded_redis_persists_and_is_owned_by_one_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = EmbeddedRedis(state).start()
    try:
        import redis

        client = redis.Redis.from_url(first.redis_url)
        client.set("trolley:test", "kept")
        client.close()
        with pytest.raises(EmbeddedError, match="another trolley-tasks command"):
            EmbeddedRedis(state).start()
        reader = EmbeddedRedis(state).start(exclusive=False)  # status/jobs read a running export's server
        assert reader.redis_url == first.redis_url
        reader.stop()
    finally:
        first.stop()
    assert not _answers(first.socket_path)  # stopped with the command that started it
    second = EmbeddedRedis(state).start()
    try:
        import redis

        client = redis.Redis.from_url(second.redis_url)
        assert client.get("trolley:test") == b"kept"
        client.close()
    finally:
        second.stop()


def test_stopping_the_embedded_redis_does_not_reconnect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SHUTDOWN is answered by the server closing the connection; redis-py's default retries then reconnected, with
    back-off, to a socket that was gone: 4.5 s added to every embedded command. One connection, and the data saved."""
    import redis.connection

    server = EmbeddedRedis(tmp_path / "state").start()
    connects: list[object] = []
    real_connect = redis.connection.UnixDomainSocketConnection._connect

    def counted(self: redis.connection.UnixDomainSocketConnection) -> object:
        connects.append(self)
        return real_connect(self)

    monkeypatch.setattr(redis.connection.UnixDomainSocketConnection, "_connect", counted)
    server.stop()
    assert len(connects) == 1 and not _answers(server.socket_path)
    assert (tmp_path / "state" / "trolley.rdb").exists()


def test_socket_path_falls_back_when_the_state_dir_is_deep(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    assert len(str(socket_path_for(deep))) <= 100
    assert socket_path_for(tmp_path) == tmp_path.resolve() / "redis.sock"


@pytest.mark.parametrize(
    ("cohort_text", "extra", "message"),
    [
        ("StudyInstanceUID\n1.2.3\n1.2.x4\n", [], "row 3, column StudyInstanceUID"),
        ("StudyInstanceUID\n1.2.3,extra\n", [], "row 2: more values than header columns"),
        ("Name\nbob\n", [], "the header names none of StudyInstanceUID"),
        (None, ["--study-uid", "1..2"], "--study-uid"),
        (None, [], "nothing to export"),
        ("StudyInstanceUID\n1.2.3\n", ["--study-uid", "1.2.3"], "not both"),
        ("StudyInstanceUID\n1.2.3\n", ["--no-wait"], "--no-wait needs a broker"),
        ("StudyInstanceUID\n1.2.3\n", ["--source", "nope"], "no [sources.nope]"),
    ],
)
def test_export_refuses_bad_input_with_one_line(
    tmp_path: Path, config: Path, cohort_text: str | None, extra: list[str], message: str
) -> None:
    args = ["export", "--source", "pacs", "--out", str(tmp_path / "out"), "--config", str(config)]
    if cohort_text is not None:
        cohort = tmp_path / "cohort.csv"
        cohort.write_text(cohort_text)
        args.insert(1, str(cohort))
    if "--source" in extra:
        args[args.index("--source") + 1] = extra[extra.index("--source") + 1]
        extra = []
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert message in one_error_line(result)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_workers_option_needs_embedded_mode(tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROLLEY_BROKER__URL", "redis://127.0.0.1:9/0")
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("StudyInstanceUID\n1.2.3\n")
    result = runner.invoke(
        app, ["export", str(cohort), "--source", "pacs", "--out", str(tmp_path), "--workers", "2", "-c", str(config)]
    )
    assert result.exit_code == 2
    assert "--workers is for embedded mode" in one_error_line(result)


class FakeJob:
    """A job that advances one step per status() call, with one failure on the way."""

    job_id = "tfake"

    def __init__(self) -> None:
        self.step = 0

    def status(self) -> JobStatus:
        self.step = min(self.step + 1, 4)
        ended = self.step == 4
        return JobStatus(
            job_id=self.job_id,
            state=JobState.DONE_WITH_FAILURES if ended else JobState.RUNNING,
            source="pacs",
            output="/data/out",
            layout="study-series",
            expected=4,
            done=min(self.step, 3),
            failed=1 if self.step >= 2 else 0,
            bytes=self.step * 526_000,
            rate=2.0,
            eta_seconds=None if ended else 4 - self.step,
            failures_by_class={"not-found": 1} if self.step >= 2 else {},
        )

    def failures(self) -> list[Failure]:
        failure = Failure(instance_uid="1.2.3.4", error_class="not-found", error="NotFoundError", message="HTTP 404")
        return [failure] if self.step >= 2 else []

    def series(self) -> list[SeriesProgress]:
        return [SeriesProgress(study_uid="1.2", series_uid="1.2.3", expected=4, done=min(self.step, 3), failed=0)]


def test_progress_bars_on_a_terminal_show_failures_as_they_happen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "POLL_SECONDS", 0)
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    status = progress.watch(FakeJob(), terminal)
    assert status.state is JobState.DONE_WITH_FAILURES
    shown = buffer.getvalue()
    assert shown.count("not-found 1.2.3.4: HTTP 404") == 1  # printed once, when it happened
    assert "1 failed" in shown and "inst/s" in shown and "series 0/1" in shown
    table = io.StringIO()
    Console(file=table, width=160).print(progress.failure_table(status, FakeJob().failures() or []))
    assert "not-found" in table.getvalue()


def test_sizes_and_rates_are_in_decimal_units() -> None:
    status = FakeJob().status().model_copy(update={"bytes": 526_300_000, "byte_rate": 1_534.9})
    line = progress.progress_line(status)
    assert "526.3 MB," in line and "2.0 inst/s, 1.5 kB/s, ETA" in line


def test_progress_without_a_terminal_is_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "POLL_SECONDS", 0)
    stream = io.StringIO()
    setup_logging("info", stream=stream)
    status = progress.watch(FakeJob(), Console(file=io.StringIO(), force_terminal=False))
    assert status.failed == 1
    lines = stream.getvalue().splitlines()
    assert any("failed: not-found 1.2.3.4: HTTP 404" in line for line in lines)
    assert "job tfake done-with-failures: 3/4 instances" in lines[-1]


def test_a_closed_window_is_announced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import datetime, timedelta

    from trolley_tasks.cli.export import window_notice
    from trolley_tasks.engine.settings import load_settings

    opens = datetime.now() + timedelta(hours=2)
    closes = opens + timedelta(hours=1)
    path = tmp_path / "trolley.toml"
    path.write_text(
        CONFIG + f'\n[sources.night]\nurl = "http://127.0.0.1:9/x"\nwindow = "{opens:%H:%M}-{closes:%H:%M}"\n'
    )
    settings = load_settings(path)
    window_notice(settings, "pacs")
    assert capsys.readouterr().err == ""
    window_notice(settings, "night")
    assert f"fetches only in the window {opens:%H:%M}-{closes:%H:%M}: the job waits " in capsys.readouterr().err


def test_the_bars_read_every_series_at_most_a_tenth_of_the_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading each series' counts costs time in proportion to the series (0.4 s at 20,000 series): the display
    reads them again only after ten times as long as the last read took, and once more when the job ends."""
    now = [0.0]

    class ManySeries(FakeJob):
        reads = 0

        def status(self) -> JobStatus:
            now[0] += 0.5  # the poll's wait
            self.step = min(self.step + 1, 40)
            state = JobState.DONE if self.step == 40 else JobState.RUNNING
            return JobStatus(
                job_id=self.job_id,
                state=state,
                source="pacs",
                output="/o",
                layout="flat",
                expected=4,
                done=self.step // 10,
            )

        def series(self) -> list[SeriesProgress]:
            self.reads += 1
            now[0] += 1.0  # what reading them took
            done = 4 if self.step == 40 else 0
            return [SeriesProgress(study_uid="1.2", series_uid="1.2.3", expected=4, done=done, failed=0)]

    monkeypatch.setattr(progress, "POLL_SECONDS", 0)
    monkeypatch.setattr(progress, "monotonic", lambda: now[0])
    job = ManySeries()
    buffer = io.StringIO()
    progress.watch(job, Console(file=buffer, force_terminal=True, width=160, color_system=None))
    assert 3 <= job.reads <= 4  # over about 24 s of polls, at most every 10 s and at the end: not 40 times
    assert "series 1/1" in buffer.getvalue()  # the last read, when the job ended


def test_the_failure_lines_read_no_more_records_than_they_print(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job with thousands of failures: the display prints the first 20 and a pointer, once, and reads no more
    failure records than those (it read every record at every poll where the count grew)."""
    read = [0]

    class ManyFailures(FakeJob):
        def status(self) -> JobStatus:
            self.step += 1
            state = JobState.DONE_WITH_FAILURES if self.step == 30 else JobState.RUNNING
            failed = min(self.step * 100, 2900)
            return JobStatus(
                job_id=self.job_id, state=state, source="pacs", output="/o", layout="flat", expected=3000, failed=failed
            )

        def failures(self) -> Iterator[Failure]:
            for n in range(min(self.step * 100, 2900)):
                read[0] += 1
                yield Failure(instance_uid=f"1.2.{n}", error_class="not-found", error="E", message="gone")

    monkeypatch.setattr(progress, "POLL_SECONDS", 0)
    lines: list[str] = []
    ticker = progress._FailureTicker(ManyFailures(), lines.append)
    job = ticker.view
    while True:
        status = job.status()
        ticker.update(status)
        if status.state is JobState.DONE_WITH_FAILURES:
            break
    assert lines[:20] == [f"not-found 1.2.{n}: gone" for n in range(20)]
    assert len(lines) == 21 and lines[20].startswith("more failures: see 'trolley-tasks status tfake'")
    assert read[0] <= 21
