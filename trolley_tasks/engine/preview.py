"""The dry run of an export: what a series filter keeps and excludes, and about how many bytes that is.

``trolley-tasks export ... --dry-run`` answers "what would this take?" before a night's transfer: it reads the
cohort the way the producer does, asks the searcher for each study at INSTANCE depth (the same call expansion
makes), applies the filter, and fetches ONE kept instance to learn a typical size. The estimate is the kept instance
count times that size: research cohorts are mostly series of one modality with instances of one size, so one
sample is within a few percent for CT and MR; a cohort mixing modalities gets an honest order of magnitude.

Nothing is written to the ledger and nothing is queued: the dry run needs neither a broker nor a Redis, only the
source profile. It holds no patient value beyond the UIDs it prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from trolley_tasks.cohort import CohortError, CohortRow
from trolley_tasks.core import InstanceReference, QueryLevels, Study
from trolley_tasks.deid import DeidProfile
from trolley_tasks.downloaders.base import Downloader
from trolley_tasks.engine.producer import Cohort, cohort_rows
from trolley_tasks.engine.settings import Settings
from trolley_tasks.profiles import build_downloader, build_searcher
from trolley_tasks.searchers.base import Searcher
from trolley_tasks.series_filter import SeriesFilter


@dataclass(frozen=True)
class SeriesPreview:
    """One series of the cohort, and the rule that would exclude it (None: kept)."""

    study_uid: str
    series_uid: str
    modality: str
    description: str
    instances: int
    rule: str | None
    sample_uid: str = ""
    """A kept SOPInstanceUID of the series, for the size sample."""


@dataclass
class Preview:
    """What an export would take. ``sample_size`` is the size in bytes of the one instance fetched (None when
    nothing is kept, or the cohort names no series to sample)."""

    series: list[SeriesPreview] = field(default_factory=list)
    sample_size: int | None = None
    bad_rows: list[str] = field(default_factory=list)

    def _count(self, kept: bool) -> tuple[int, int, int]:
        chosen = [s for s in self.series if (s.rule is None) == kept]
        return len({s.study_uid for s in chosen}), len(chosen), sum(s.instances for s in chosen)

    @property
    def kept(self) -> tuple[int, int, int]:
        """(studies, series, instances) kept."""
        return self._count(True)

    @property
    def excluded(self) -> tuple[int, int, int]:
        """(studies, series, instances) excluded (a study counts when any of its series is)."""
        return self._count(False)

    @property
    def estimated_bytes(self) -> int | None:
        return None if self.sample_size is None else self.kept[2] * self.sample_size


def preview(
    settings: Settings,
    cohort: Cohort,
    *,
    source: str,
    filters: SeriesFilter | None,
    skip_bad_rows: bool = False,
    deid: DeidProfile | None = None,
) -> Preview:
    """Search every study of ``cohort`` on ``source`` and apply ``filters`` (and the SOP class exclusions of a
    de-identification profile, as expansion does); fetch one kept instance to size it.

    Raises what the searcher raises (a study not found, a source that is down), and CohortError for a bad row
    (unless ``skip_bad_rows``): a dry run that hides a failure would promise an export that cannot happen.
    """
    profile = settings.source(source)
    searcher = build_searcher(profile, source)
    result = Preview()
    try:
        for item in cohort_rows(cohort, skip_bad_rows)[0]:
            if isinstance(item, CohortError):
                result.bad_rows.append(str(item))
                continue
            result.series.extend(_row_series(searcher, item, filters or SeriesFilter(), deid))
    finally:
        searcher.close()
    sample = next((s for s in result.series if s.rule is None and s.sample_uid), None)
    if sample is not None:
        downloader = build_downloader(profile, source)
        try:
            reference = InstanceReference(sample.study_uid, sample.series_uid, sample.sample_uid)
            result.sample_size = _sample_size(downloader, reference)
        finally:
            downloader.close()
    return result


def _row_series(
    searcher: Searcher, row: CohortRow, rules: SeriesFilter, deid: DeidProfile | None
) -> Iterator[SeriesPreview]:
    if row.instance_uids:  # the cohort names each instance: taken as given, as expansion does
        for series_uid in dict.fromkeys(row.series_uids):
            uids = [uid for uid, se in zip(row.instance_uids, row.series_uids, strict=True) if se == series_uid]
            yield SeriesPreview(row.study_uid, series_uid, "", "", len(uids), None, uids[0])
        return
    if row.study_uid:
        studies = [searcher.find_study_by_id(row.study_uid, QueryLevels.INSTANCE)]
    else:
        studies = [
            searcher.find_study_by_id(s.uid, QueryLevels.INSTANCE) for s in searcher.find_studies(row.to_query())
        ]
    for study in studies:
        yield from _study_series(study, row, rules, deid)


def _study_series(
    study: Study, row: CohortRow, rules: SeriesFilter, deid: DeidProfile | None
) -> Iterator[SeriesPreview]:
    wanted = set(row.series_uids)
    for series in study.series:
        if wanted and series.uid not in wanted:
            continue
        rule = rules.exclusion(series)
        kept = rules.kept_instances(series)
        if rule is None and deid is not None:
            sop_classes = {i.uid: str(i.data.get("SOPClassUID", "") or "") for i in series.instances}
            reasons = [deid.exclusion(sop_classes[uid], None) for uid in kept]
            if kept and all(reasons):
                rule = reasons[0]
            kept = [uid for uid, reason in zip(kept, reasons, strict=True) if reason is None]
        count = len(series.instances) if rule is not None else len(kept)
        modality = str(series.data.get("Modality", "") or "")
        description = str(series.data.get("SeriesDescription", "") or "")
        yield SeriesPreview(study.uid, series.uid, modality, description, count, rule, kept[0] if kept else "")


def _sample_size(downloader: Downloader, reference: InstanceReference) -> int:
    """The byte size of one instance as the source sends it (streamed and counted, never kept)."""
    for _, payload in downloader.iter_raw([reference]):
        if isinstance(payload, bytes):
            return len(payload)
        return sum(len(chunk) for chunk in payload)
    return 0
