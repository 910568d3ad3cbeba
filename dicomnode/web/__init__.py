"""DICOMweb (PS3.18): STOW-RS, QIDO-RS and WADO-RS over HTTP(S)."""

from dicomnode.web.app import ServerHandle, WebLimits, hash_token, make_app, serve_in_thread
from dicomnode.web.multipart import MultipartError, MultipartParser

__all__ = ["MultipartError", "MultipartParser", "ServerHandle", "WebLimits", "hash_token",
           "make_app", "serve_in_thread"]
