"""The server's TLS certificate dates: an out-of-date certificate is refused at start (every site would refuse
it), and one close to expiry is warned of at start, on the admin page and once a day in the log, since in a
federation running for months no site can connect from the day it expires."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

WARN_DAYS = 14  # warned of this long before it expires


def certificate_dates(cert: str | Path) -> tuple[float, float] | None:
    """(not before, not after) of a PEM certificate, as epoch seconds; None where this Python cannot read
    them (CPython's own PEM decoder, so no further dependency: a check skipped, never failed)."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(cert))
        return ssl.cert_time_to_seconds(decoded["notBefore"]), ssl.cert_time_to_seconds(decoded["notAfter"])
    except (AttributeError, KeyError, ValueError, ssl.SSLError):
        return None


def certificate_names(cert: str | Path) -> list[str]:
    """The host names and addresses a PEM certificate is valid for (its subject alternative names, DNS names
    first; wildcards left out: they name no host); empty where this Python cannot read them."""
    try:
        names = ssl._ssl._test_decode_cert(str(cert)).get("subjectAltName", ())
    except (AttributeError, ValueError, ssl.SSLError):
        return []
    dns = [value for kind, value in names if kind == "DNS" and "*" not in value]
    return dns + [value.strip() for kind, value in names if kind == "IP Address"]


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def expiry_warning(not_after: float, now: float) -> str | None:
    """What to tell the admin while the certificate expires within WARN_DAYS; None before that."""
    days = (not_after - now) / 86400
    if days >= WARN_DAYS:
        return None
    return (f"the server's TLS certificate expires on {utc(not_after)} (in {max(days, 0):.0f} days): no site can "
            "connect from then until it is renewed and the server restarted")
