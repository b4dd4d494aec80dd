"""dicomtrolley's ``auth`` module under our package: ``from trolley_tasks.auth import create_session, VitreaAuth``.

The implementations live in :mod:`trolley_tasks.transports.auth`, with the other HTTP authentications.
``DICOMTrolleyAuthError`` is our :class:`~trolley_tasks.errors.AuthError` (a failed login pauses an engine job).
"""

from trolley_tasks.errors import AuthError as DICOMTrolleyAuthError
from trolley_tasks.transports.auth import VitreaAuth, create_session

__all__ = ["DICOMTrolleyAuthError", "VitreaAuth", "create_session"]
