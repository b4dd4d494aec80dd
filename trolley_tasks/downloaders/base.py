"""The Downloader protocol and the behaviour all downloaders share.

The raw path, :meth:`Downloader.iter_raw`, is what the engine uses: it yields each instance's bytes as they came
from the server, without decoding pixel data: a :class:`~trolley_tasks.formats.part10.Part10Stream` (HTTP: the
chunks with the header already read from them, so storage does not walk them again), ``bytes`` (C-GET) or a
:class:`~trolley_tasks.formats.part10.Part10File` (C-MOVE: a spooled file that storage renames into place).

Contract of ``iter_raw(objects)``:

- It raises :class:`~trolley_tasks.errors.NonInstanceParameterError` (or ``NonSeriesParameterError``) *before
  yielding anything* when it cannot fetch an object at the level given (for example a StudyReference to WADO-URI).
- It yields ``(InstanceReference, payload)``. A stream must be consumed entirely before the next item is
  requested (as with ``itertools.groupby``).
- It either delivers every instance it was asked for, or raises a :class:`~trolley_tasks.errors.TrolleyError`
  after delivering what it could. A server that answers "success" with instances missing is an error, never a
  quietly shorter answer. The caller fails exactly the instances it asked for and did not receive.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from io import BytesIO
from typing import ClassVar, Protocol, runtime_checkable

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from trolley_tasks.core import Downloadable, Instance, InstanceReference, is_valid_uid
from trolley_tasks.errors import ConfigurationError, PayloadInvalidError
from trolley_tasks.formats.part10 import Part10Header, RawPayload, check_identity

AS_STORED = "*"
"""The ``transfer_syntax`` that asks for each instance as the archive stored it: byte-identical files (WADO-RS
``transfer-syntax=*``, PS3.18 8.7.3.5.2; WADO-URI without a ``transferSyntax`` parameter)."""


def checked_transfer_syntax(value: str, downloader: str) -> str:
    """``value`` when it is :data:`AS_STORED` or a transfer syntax UID; ConfigurationError naming ``downloader``."""
    if value != AS_STORED and not is_valid_uid(value):
        raise ConfigurationError(f"{downloader}: transfer_syntax {value!r} is neither '*' (as stored) nor a UID")
    return value


@runtime_checkable
class Downloader(Protocol):
    """Something that fetches DICOM instances."""

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Each instance's bytes as the server sent them. See the module docstring for the contract."""
        ...

    def datasets(self, objects: Downloadable | Iterable[Downloadable]) -> Iterator[Dataset]:
        """A pydicom Dataset for each instance contained in ``objects``."""
        ...

    def get_dataset(self, instance: InstanceReference | Instance) -> Dataset:
        """The Dataset of one instance."""
        ...

    def close(self) -> None:
        """Release what the downloader opened (its own sessions, associations, receivers). A session the caller
        passed in stays open. The downloader may not be used afterwards."""
        ...

    @property
    def whole_series(self) -> bool:
        """True when several instances of one series are fetched by one request for the *whole* series.

        A caller that batches instances (the engine) should then put a series in one batch: a batch smaller than
        the series would download the series once per batch. False when each instance asked for is fetched alone
        or by an exact list (WADO-URI, RAD-69, C-GET, C-MOVE).
        """
        ...


def payload_bytes(payload: RawPayload) -> bytes:
    """The whole payload in memory (for datasets(); the engine streams instead)."""
    return payload if isinstance(payload, bytes) else b"".join(payload)


def parse_dataset(data: bytes, reference: InstanceReference, source: str | None = None) -> Dataset:
    """Parse a Part 10 file, raising PayloadInvalidError when it is not DICOM or is another instance than the one
    expected (:func:`~trolley_tasks.formats.part10.check_identity`, the check storage makes)."""
    try:
        dataset = pydicom.dcmread(BytesIO(data), force=False)
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        raise PayloadInvalidError(f"not a DICOM file: {exc}", source=source, reference=reference) from exc
    check_identity(Part10Header.from_dataset(dataset), reference, source=source)
    return dataset


class DownloaderBase:
    """``datasets`` and ``get_dataset`` in terms of ``iter_raw``, so every downloader parses and checks alike.

    Two class attributes tell an in-process caller (:class:`~trolley_tasks.trolley.Trolley`) what it may do:

    - ``thread_safe``: one instance may serve several threads at once (the HTTP clients: a requests session and
      VitreaAuth's login lock are shared safely). False for C-GET/C-MOVE, whose association serves one thread.
    - ``raw_files``: ``iter_raw`` yields whole Part 10 files that storage can write as they came. False for WADO-RS
      metadata, which has datasets without pixel data and no file to keep.
    """

    source: str | None = None
    thread_safe: ClassVar[bool] = True
    raw_files: ClassVar[bool] = True

    @property
    def whole_series(self) -> bool:
        """See :attr:`Downloader.whole_series`; False unless a downloader fetches series whole."""
        return False

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        raise NotImplementedError

    def datasets(self, objects: Downloadable | Iterable[Downloadable]) -> Iterator[Dataset]:
        for reference, payload in self.iter_raw(objects):
            yield parse_dataset(payload_bytes(payload), reference, self.source)

    def get_dataset(self, instance: InstanceReference | Instance) -> Dataset:
        reference = instance.reference() if isinstance(instance, Instance) else instance
        found = list(self.datasets(reference))
        if len(found) != 1:
            raise PayloadInvalidError(
                f"expected one dataset for {reference}, got {len(found)}", source=self.source, reference=reference
            )
        return found[0]

    def close(self) -> None:
        """Nothing to release by default."""
