"""Bytes to and from DICOM, with no network: Part 10 headers, multipart bodies, DICOM JSON."""
