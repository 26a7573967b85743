"""Transient or permanent: whether a failure is worth another try.

Transient: something outside the input failed (a service down or restarting, a 5xx, a timeout);
the same input may succeed later, so stages retry it and never record it as final. Permanent:
the input itself is bad (corrupt media, no face); a record of that is final.
"""
from __future__ import annotations


class TransientError(RuntimeError):
    """A failure of something outside the input (a service down, a timeout): retrying may succeed."""


HTTP_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (TransientError, ConnectionError, TimeoutError)):
        return True
    import urllib3

    if isinstance(e, urllib3.exceptions.HTTPError):  # protocol errors, max retries, read timeouts
        return True
    import requests

    if isinstance(e, (requests.ConnectionError, requests.Timeout)):
        return True
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return e.response.status_code in HTTP_TRANSIENT
    from minio.error import S3Error, ServerError

    from .storage import TRANSIENT_CODES

    if isinstance(e, ServerError):
        return True
    return isinstance(e, S3Error) and e.code in TRANSIENT_CODES
