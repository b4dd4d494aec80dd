"""dicomtrolley's ``servers`` module: ready-made logins and trolleys for two vendors' servers.

- :class:`VitreaConnection` (Vitrea Connection 8.2.0.1): a session logged in with the Vitrea flow, and a
  MINT + WADO-URI trolley on it. dicomtrolley marks it deprecated in favour of ``auth.VitreaAuth``; here it is built
  on :class:`~trolley_tasks.transports.auth.VitreaAuth`, so its session also logs in again on a 401.
- :class:`IMPAXDataCenter` (AGFA IMPAX Data Center 3.1.1): a session logged in to WADO with IMPAX's odd flow
  (:func:`~trolley_tasks.transports.auth.impax_login`), and a DICOM-QR + WADO-URI trolley.

Both raise our error tree: a refused login is :class:`~trolley_tasks.errors.AuthError` (a DICOMTrolleyError).
"""

from __future__ import annotations

import requests

from trolley_tasks.downloaders.wado_uri import WadoURI
from trolley_tasks.searchers.dicom_qr import DICOMQR
from trolley_tasks.searchers.mint import Mint
from trolley_tasks.transports.auth import VitreaAuth, impax_login, make_session
from trolley_tasks.trolley import Trolley


class VitreaConnection:
    """A server running Vitrea Connection 8.2.0.1.

    Parameters
    ----------
    login_url
        The full URL of the login call, ``https://`` included.
    """

    def __init__(self, login_url: str) -> None:
        self.login_url = login_url

    def log_in(self, user: str, password: str, realm: str) -> requests.Session:
        """A session logged in now (so that a wrong password shows here, not at the first search).

        Raises
        ------
        AuthError
            The login was refused.
        """
        auth = VitreaAuth(self.login_url, user, password, realm)
        session = make_session(auth)
        auth.login()
        return session

    def get_mint_trolley(self, user: str, password: str, realm: str, wado_url: str, mint_url: str) -> Trolley:
        """A logged-in trolley that searches with MINT at ``mint_url`` and downloads with WADO-URI at ``wado_url``."""
        session = self.log_in(user=user, password=password, realm=realm)
        return Trolley(downloader=WadoURI(session, wado_url), searcher=Mint(session, mint_url))


class IMPAXDataCenter:
    """WADO login for AGFA IMPAX Data Center 3.1.1.

    Parameters
    ----------
    wado_url
        The full URL of the WADO endpoint, ``https://`` and port included.
    """

    def __init__(self, wado_url: str) -> None:
        self.wado_url = wado_url

    def log_in(self, user: str, password: str) -> requests.Session:
        """A session logged in to IMPAX's WADO; AuthError when the server says "Login Failed!"."""
        return impax_login(self.wado_url, user, password)

    def get_dicom_qr_trolley(
        self,
        wado_user: str,
        wado_pass: str,
        host: str,
        port: int,
        aet: str = "DICOMTROLLEY",
        aec: str = "ANY-SCP",
    ) -> Trolley:
        """Log in to WADO, then a trolley that searches with DICOM-QR (``aet`` calling ``aec`` at ``host:port``,
        checked at the first search) and downloads with WADO-URI."""
        session = self.log_in(wado_user, wado_pass)
        return Trolley(downloader=WadoURI(session, self.wado_url), searcher=DICOMQR(host, port, aet=aet, aec=aec))
