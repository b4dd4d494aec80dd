"""Bounded memory: a 2 GB instance streamed through WADO-RS's multipart path into storage keeps a worker's RSS flat;
every answer read into memory has a cap, enforced while it streams; paging stops a server that never ends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import psutil
import pytest
import requests
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.fakehttp import FakeHTTPServer, FakeRequest, Reply
from trolley_tasks.core import SeriesReference
from trolley_tasks.errors import ErrorClass, RequestRejectedError
from trolley_tasks.formats.multipart import MAX_EPILOGUE_BYTES, MultipartReader
from trolley_tasks.searchers.qido_rs_paging import paged_search
from trolley_tasks.storage import StorageDir
from trolley_tasks.transports.http import bounded, read_body, request

BIG = 2 * 1000**3
"""The instance's pixel data: 2 GB."""
RSS_BOUND = 300 * 1024**2
CHUNK = b"\x5a" * (1024 * 1024)
BOUNDARY = "trolley-big-boundary"


def part10_head(study: str, series: str, instance: str, pixel_bytes: int) -> bytes:
    """A Part 10 file up to the PixelData value: file meta, the UIDs, then (7FE0,0010) OB of ``pixel_bytes``."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = instance
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    pixel_header = b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_bytes.to_bytes(4, "little")  # PS3.5 7.1.2
    return buffer.getvalue() + pixel_header


def big_multipart(head: bytes) -> Iterator[bytes]:
    yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
    for _ in range(BIG // len(CHUNK)):
        yield CHUNK
    yield CHUNK[: BIG % len(CHUNK)]
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from trolley_tasks.core import SeriesReference
    from trolley_tasks.downloaders.wado_rs import WadoRS
    from trolley_tasks.storage import StorageDir
    url, study, series, out = sys.argv[1:5]
    downloader = WadoRS(None, url, max_instance_bytes=3 * 1000**3)
    saved = [StorageDir().save_raw(ref, payload, out) for ref, payload in
             downloader.iter_raw(SeriesReference(study, series))]
    downloader.close()
    print(json.dumps({"sizes": [s.size for s in saved], "paths": [str(s.path) for s in saved],
                      "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


@pytest.mark.slow
def test_a_2gb_instance_streams_through_multipart_into_storage_with_flat_rss(tmp_path: Path) -> None:
    study, series, instance = generate_uid(), generate_uid(), generate_uid()
    head = part10_head(study, series, instance, BIG)

    def serve(req: FakeRequest) -> Reply:
        content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        return Reply(200, big_multipart(head), {"Content-Type": content_type})

    with FakeHTTPServer(serve) as server:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, server.url, study, series, str(tmp_path / "out")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watched = psutil.Process(child.pid)
        peak = 0
        while child.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        out, err = child.communicate()
    assert child.returncode == 0, err[-2000:]
    report = json.loads(out)
    kernel_peak = report["ru_maxrss_kb"] * 1024
    print(
        f"2 GB instance via multipart: peak RSS sampled by psutil {peak / 2**20:.1f} MiB, "
        f"ru_maxrss {kernel_peak / 2**20:.1f} MiB"
    )
    assert report["sizes"] == [len(head) + BIG]
    saved = Path(report["paths"][0])
    assert saved.is_relative_to(tmp_path / "out") and instance.replace(".", "_") in saved.name
    assert saved.stat().st_size == len(head) + BIG
    assert 0 < peak < RSS_BOUND
    assert kernel_peak < RSS_BOUND


def test_bounded_passes_up_to_the_limit_then_rejects() -> None:
    assert b"".join(bounded([b"ab", b"cd"], 4, what="x")) == b"abcd"
    with pytest.raises(RequestRejectedError, match="larger than 3 bytes") as raised:
        list(bounded([b"ab", b"cd"], 3, what="x"))
    assert raised.value.error_class is ErrorClass.REQUEST_REJECTED


def test_read_body_refuses_an_oversize_answer_while_it_streams() -> None:
    sent: list[int] = []

    def endless() -> Iterator[bytes]:
        for index in range(10_000):  # 640 MB if read whole
            sent.append(index)
            yield b"[" + b" " * 65534 + b"]"

    with FakeHTTPServer(lambda req: Reply(200, endless())) as server:
        response = request(requests.Session(), "GET", f"{server.url}/qido", stream=True)
        with pytest.raises(RequestRejectedError, match="larger than 1048576 bytes"):
            read_body(response, limit=1024 * 1024)
        announced = request(requests.Session(), "GET", f"{server.url}/qido", stream=True)
        announced.headers["Content-Length"] = str(10**9)
        with pytest.raises(RequestRejectedError, match="announces 1000000000 bytes"):
            read_body(announced, limit=1024 * 1024)
    assert len(sent) < 1000  # the server was not read to its end


def test_paging_stops_a_server_that_invents_uids_for_ever() -> None:
    pages = 0

    def invent(req: FakeRequest) -> Reply:
        nonlocal pages
        pages += 1
        size = int(req.param("limit", "10"))
        body = [{"00080018": {"vr": "UI", "Value": [generate_uid()]}} for _ in range(size)]
        return Reply(200, json.dumps(body).encode(), {"Content-Type": "application/dicom+json"})

    with FakeHTTPServer(invent) as server, pytest.raises(RequestRejectedError, match="more than|larger than"):
        paged_search(
            requests.Session(), f"{server.url}/instances", "", key="SOPInstanceUID", page_size=10, max_bytes=64 * 1024
        )
    assert 10 < pages < 200  # it paged, and it stopped


def test_multipart_epilogue_is_drained_with_a_limit() -> None:
    drained = []

    def body() -> Iterator[bytes]:
        yield b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b--\r\n"
        for index in range(100_000):
            drained.append(index)
            yield b"e" * 1024

    reader = MultipartReader(body(), "b")
    assert [part.read() for part in reader] == [b"hello"]
    assert reader.epilogue_cut
    assert len(drained) <= MAX_EPILOGUE_BYTES // 1024 + 1


def test_wado_rs_refuses_an_instance_over_max_instance_bytes(tmp_path: Path) -> None:
    from trolley_tasks.downloaders.wado_rs import WadoRS

    study, series, instance = generate_uid(), generate_uid(), generate_uid()
    head = part10_head(study, series, instance, 4 * len(CHUNK))
    body = [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head, *[CHUNK] * 4]
    body.append(f"\r\n--{BOUNDARY}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    with FakeHTTPServer(lambda req: Reply(200, iter(body), {"Content-Type": content_type})) as server:
        downloader = WadoRS(None, server.url, max_instance_bytes=2 * len(CHUNK))
        with pytest.raises(RequestRejectedError, match="larger than 2097152 bytes"):
            for ref, payload in downloader.iter_raw(SeriesReference(study, series)):
                StorageDir().save_raw(ref, payload, tmp_path)
        downloader.close()
    assert not (tmp_path / study).exists()
    assert list((tmp_path / ".trolley" / "tmp").iterdir()) == []  # the temp file went with the refusal
