"""Per-site bearer tokens: created once (printed once), stored only as SHA-256 hashes, revocable.

Tokens are 256-bit random strings, so a fast hash is enough (no password stretching needed); the
comparison is constant-time. The file is re-read when it changes, so ``token revoke`` takes effect
on a running server without a restart. Changes hold ``tokens.lock``: two ``token`` commands at once
each wrote the file without the other's site.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from fedmix_engine.atomic import atomic_write_bytes, make_folder
from fedmix_engine.errors import InputError
from fedmix_engine.json_values import parse_json

TOKENS_FILE = "tokens.json"
TOKENS_LOCK = "tokens.lock"  # held while a command reads, changes and writes the token file
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# a site's name becomes a file name on the server (current/<site>.safetensors); Windows reserves these,
# with any extension and in any case, so a server there could never store that site's update
_WINDOWS_DEVICE = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


def read_token_file(path: Path) -> str:
    """The token in a site's token file (``join --token-file``, napari's Train), or an error naming the file
    (not found, unreadable, empty); whether it is one token is the client's check, told the file's name. Read
    by its byte-order mark: Windows PowerShell 5's ``token add SITE > site.token`` writes UTF-16, and Notepad
    may save UTF-8 with a mark; the locale's encoding read either as a token with stray characters."""
    try:
        raw = path.read_bytes()
        encoding = "utf-16" if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
        token = raw.decode(encoding).strip()
    except FileNotFoundError:
        raise InputError(path, "token file not found (the admin's 'fedmix-engine token add' prints the token)") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the token file ({exc})") from None
    if not token:
        raise InputError(path, "the token file is empty")
    return token


def readable_by_others(path: Path, what: str) -> str | None:
    """What to say, as ssh does of a private key, when a secret's file may be read by other users of the
    machine (None when only its owner may)."""
    mode = path.stat().st_mode & 0o777
    if os.name == "posix" and mode & 0o077:
        return f"{path}: other users of this machine can read {what} (mode {mode:o}); chmod 600 {path}"
    return None


def token_problem(token: str) -> str | None:
    """What makes ``token`` unusable as a bearer token, or None. Said before the first request: a token file
    that also holds a second line would otherwise fail inside the HTTP library, retried as if the network
    had failed."""
    lines = token.strip().splitlines()
    if not lines:
        return "the token is empty"
    if len(lines) > 1:
        return (f"{len(lines)} lines where a token is one (fmx_...): keep only the line 'fedmix-engine token add' "
                "printed first")
    if not re.fullmatch(r"[\x21-\x7e]+", lines[0]):
        return "the token holds spaces or characters other than printable ASCII; a token is one word (fmx_...)"
    return None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _parse_entries(path: Path) -> dict[str, dict]:
    """The token file's entries, or an error naming it: the file is written whole by ``token add``, so a
    damaged one was edited by hand (or by a failing disk); a traceback from every command and request
    said neither which file nor what to do."""
    try:
        entries = parse_json(path.read_bytes())
        if not isinstance(entries, dict) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                                    for e in entries.values()):
            raise ValueError("not a map of site names to entries with a sha256")
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise InputError(path, f"damaged token file ({exc}): restore it from a backup, or move it away and give "
                               "every site a new token with 'fedmix-engine token add' (a token cannot be "
                               "recovered from its stored hash)") from None
    return entries


class TokenStore:
    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / TOKENS_FILE
        self._version: tuple[int, int, int] | None = None
        self._entries: dict[str, dict] = {}

    def _load(self) -> dict[str, dict]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        # every save replaces the file (a new inode): the inode tells a revoke apart from the add before it
        # even when both fall in one tick of the file system's coarse clock and leave the same mtime
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if version != self._version:
            self._entries = _parse_entries(self.path)
            self._version = version
        return self._entries

    @contextmanager
    def _changing(self) -> Iterator[dict[str, dict]]:
        """The entries to change, read under the lock, then saved: a read-change-write without it lost
        the site of a ``token add`` run at the same time (both tokens printed, one refused at joining)."""
        from filelock import FileLock, Timeout

        make_folder(self.path.parent)
        try:
            with FileLock(self.path.parent / TOKENS_LOCK, thread_local=False, timeout=60):
                entries = dict(self._load())
                yield entries
                self._save(entries)
        except Timeout:
            raise InputError(self.path, f"another token command has held {TOKENS_LOCK} for a minute; if none is "
                                        "running, try again") from None

    def _save(self, entries: dict[str, dict]) -> None:
        atomic_write_bytes(self.path, (json.dumps(entries, indent=2, sort_keys=True) + "\n").encode(), mode=0o600)

    def add(self, site: str) -> str:
        """Create (or replace) a site's token and return it — the only time it is visible."""
        if not _SITE.fullmatch(site):  # it names files on the server: ASCII, as every file system takes it
            raise InputError("SITE", f"site name '{site}' must use ASCII letters, digits, '.', '-' or '_' (max 64)")
        if _WINDOWS_DEVICE.match(site):
            raise InputError("SITE", f"site name '{site}' is a device name on Windows (CON, PRN, AUX, NUL, COM0–9, "
                             "LPT0–9), where a server could not store its updates: choose another")
        with self._changing() as entries:
            # on a case-insensitive file system (Windows, macOS) 'Site-A' and 'site-a' would share one update file
            if twin := next((other for other in entries if other.lower() == site.lower() and other != site), None):
                raise InputError("SITE", f"site name '{site}' differs from the existing site '{twin}' only in case; "
                                 "a server on Windows or macOS would store both sites' updates in one file: use "
                                 f"'{twin}' (a new token for it) or another name")
            token = f"fmx_{secrets.token_urlsafe(32)}"
            entries[site] = {"sha256": _hash(token), "created": datetime.now(UTC).isoformat(timespec="seconds"),
                             "revoked": False}
        return token

    def revoke(self, site: str) -> None:
        with self._changing() as entries:
            if site not in entries:
                raise InputError("SITE", f"no token for site '{site}'; the sites with tokens: "
                                 f"{', '.join(sorted(entries)) or 'none yet'}")
            entries[site] = {**entries[site], "revoked": True}

    def sites(self) -> dict[str, dict]:
        return {site: {k: v for k, v in e.items() if k != "sha256"} for site, e in self._load().items()}

    def site_for(self, token: str) -> str | None:
        """The site a token belongs to, or None (unknown or revoked)."""
        digest = _hash(token)
        found = None
        for site, entry in self._load().items():
            if hmac.compare_digest(entry["sha256"], digest) and not entry.get("revoked"):
                found = site
        return found
