"""The incremental multipart/related parser: every chunking, every truncation, and flat memory on a huge part."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from trolley_tasks.errors import PayloadInvalidError
from trolley_tasks.formats.multipart import MultipartReader, boundary_from_content_type, iter_parts, parse_content_type

BOUNDARY = "b0undary-Zz9"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'

PARTS = [
    ({"Content-Type": "application/dicom", "Content-Length": "11"}, b"first\r\n--bo"),  # near-boundary bytes
    ({"Content-Type": "application/dicom"}, b"second part\r\n--b0undary-Zz"),  # scanned, delimiter prefix inside
    ({}, b""),  # no headers, empty body
    ({"Content-ID": "<doc@x>", "Content-Length": "0"}, b""),
    ({"Content-Type": "application/octet-stream"}, bytes(range(256)) * 3),
]


def build(parts: list[tuple[dict[str, str], bytes]] = PARTS, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = bytearray(preamble + (b"\r\n" if preamble else b""))
    for headers, body in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        for name, value in headers.items():
            out += f"{name}: {value}\r\n".encode()
        out += b"\r\n" + body + b"\r\n"
    out += f"--{BOUNDARY}--".encode() + epilogue
    return bytes(out)


def parse(chunks: list[bytes] | Iterator[bytes]) -> list[tuple[dict[str, str], bytes]]:
    return [(part.headers, b"".join(part)) for part in iter_parts(chunks, CONTENT_TYPE)]


def expected(parts: list[tuple[dict[str, str], bytes]] = PARTS) -> list[tuple[dict[str, str], bytes]]:
    return [({k.lower(): v for k, v in headers.items()}, body) for headers, body in parts]


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_content_type_parsing() -> None:
    assert parse_content_type(CONTENT_TYPE) == (
        "multipart/related",
        {"type": "application/dicom", "boundary": BOUNDARY},
    )
    assert boundary_from_content_type("multipart/related; boundary=abc") == "abc"
    with pytest.raises(PayloadInvalidError, match="multipart"):
        boundary_from_content_type("application/json")
    with pytest.raises(PayloadInvalidError, match="multipart"):
        boundary_from_content_type(None)


@pytest.mark.parametrize("preamble,epilogue", [(b"", b""), (b"This is a preamble", b"\r\nepilogue bytes\r\n")])
def test_every_chunk_size(preamble: bytes, epilogue: bytes) -> None:
    data = build(preamble=preamble, epilogue=epilogue)
    for size in range(1, len(data) + 1):
        assert parse(chunked(data, size)) == expected(), f"chunk size {size}"


def test_every_split_offset() -> None:
    data = build(preamble=b"pre")
    for first in range(len(data) + 1):
        for second in (first, min(len(data), first + 1), min(len(data), first + 7)):
            chunks = [data[:first], data[first:second], data[second:]]
            assert parse(chunks) == expected(), f"split at {first}/{second}"


def test_transport_padding_and_unread_bodies_are_skipped() -> None:
    data = build().replace(f"--{BOUNDARY}\r\n".encode(), f"--{BOUNDARY} \t \r\n".encode())
    reader = MultipartReader(chunked(data, 5), BOUNDARY)
    seen = [(part.index, part.content_type, part.content_id) for part in reader]  # bodies never read
    assert seen == [
        (0, "application/dicom", None),
        (1, "application/dicom", None),
        (2, "", None),
        (3, "", "doc@x"),
        (4, "application/octet-stream", None),
    ]


def test_partly_read_body_is_skipped() -> None:
    reader = iter_parts(chunked(build(), 3), CONTENT_TYPE)
    first = next(reader)
    start = next(iter(first))
    assert start and PARTS[0][1].startswith(start) and len(start) < len(PARTS[0][1])
    assert b"".join(next(reader)) == PARTS[1][1]


def test_zero_parts_is_a_valid_answer() -> None:
    assert parse([f"--{BOUNDARY}--\r\n".encode()]) == []


def truncations() -> Iterator[tuple[str, bytes]]:
    data = build()
    yield "empty answer", b""
    yield "not multipart", b"<html>Internal error</html>"
    yield "no closing boundary", data[: data.rindex(f"--{BOUNDARY}--".encode())]
    yield "ends after the last delimiter", data[: data.rindex(b"--")]
    yield "ends in headers", build(PARTS[:1])[: len(f"--{BOUNDARY}\r\nContent-Ty")]
    yield "ends in a scanned body", build(PARTS[1:2])[:-30]
    lengthy = build([({"Content-Length": "100"}, b"x" * 100)])
    yield "shorter than Content-Length", lengthy[: lengthy.index(b"x") + 60]
    yield "Content-Length too small", build([({"Content-Length": "5"}, b"x" * 10)])
    yield "Content-Length too large", build([({"Content-Length": "12"}, b"x" * 10)])
    yield "Content-Length not a number", build([({"Content-Length": "ten"}, b"x" * 10)])
    yield (
        "boundary followed by junk",
        data.replace(f"--{BOUNDARY}\r\nContent-ID".encode(), f"--{BOUNDARY}X\r\n".encode()),
    )


@pytest.mark.parametrize("case", [name for name, _ in truncations()])
def test_truncated_or_malformed_answers_raise(case: str) -> None:
    data = dict(truncations())[case]
    for size in (1, 4, 64, max(1, len(data))):
        with pytest.raises(PayloadInvalidError):
            parse(chunked(data, size))


def test_truncated_part_raises_from_its_own_body() -> None:
    """A consumer writing a part to disk sees the error before the part's end: it never commits a short file."""
    data = build([({"Content-Length": "1000"}, b"y" * 1000)])[:500]
    part = next(iter_parts(chunked(data, 64), CONTENT_TYPE))
    received = bytearray()
    with pytest.raises(PayloadInvalidError, match="shorter than its Content-Length"):
        for chunk in part:
            received += chunk
    assert 0 < len(received) < 1000


def test_error_is_raised_again_when_the_consumer_swallows_it() -> None:
    data = build([({}, b"z" * 100)])[:80]
    reader = iter_parts(chunked(data, 16), CONTENT_TYPE)
    part = next(reader)
    with pytest.raises(PayloadInvalidError):
        part.read()
    with pytest.raises(PayloadInvalidError):
        next(reader)


LARGE_PART_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    from trolley_tasks.formats.multipart import iter_parts

    SIZE = int(sys.argv[1])
    WITH_LENGTH = sys.argv[2] == "length"
    BOUNDARY = "large-part-boundary"
    BLOCK = bytes(range(256)) * 4096  # 1 MiB that never contains the delimiter

    def body():
        headers = "Content-Type: application/dicom\\r\\n"
        if WITH_LENGTH:
            headers += f"Content-Length: {SIZE}\\r\\n"
        yield f"--{BOUNDARY}\\r\\n{headers}\\r\\n".encode()
        sent = 0
        while sent < SIZE:
            block = BLOCK[: SIZE - sent]
            sent += len(block)
            for i in range(0, len(block), 256 * 1024):  # the network's 256 KB chunks
                yield block[i : i + 256 * 1024]
        yield f"\\r\\n--{BOUNDARY}\\r\\nContent-Type: text/plain\\r\\n\\r\\nsmall\\r\\n--{BOUNDARY}--\\r\\n".encode()

    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    before = peak_kib()
    sizes = []
    for part in iter_parts(body(), f"multipart/related; boundary={BOUNDARY}"):
        sizes.append(sum(len(chunk) for chunk in part))
    print(json.dumps({"sizes": sizes, "before_kib": before, "after_kib": peak_kib()}))
    """
)


@pytest.mark.parametrize("mode", ["length", "scan"])
def test_a_300_mb_part_keeps_memory_flat(mode: str) -> None:
    """Peak RSS of a subprocess parsing one 300 MB part grows by far less than the part: memory is one chunk."""
    size = 300 * 1024 * 1024
    result = subprocess.run(
        [sys.executable, "-c", LARGE_PART_SCRIPT, str(size), mode],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    growth_mib = (report["after_kib"] - report["before_kib"]) / 1024
    print(f"\n300 MB part ({mode}): peak RSS {report['after_kib'] / 1024:.1f} MiB, growth {growth_mib:.1f} MiB")
    assert report["sizes"] == [size, 5]
    assert growth_mib < 64
