"""A server's state directory read without the server (layout: ``state``): the rounds committed, their
records, the open round's uploads, the settings changed on restarts, the sites' held-out scores. What
``/v1/status``, ``fedmix-engine status`` and the admin page say comes from here. Read only, and without
torch, so that ``status`` on the server's machine answers at once whether the server runs or not."""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmix_engine.errors import InputError, first_names
from fedmix_engine.federation.federated_evaluation import EvaluationReport, pooled
from fedmix_engine.federation.server_config import CONFIG_FILE, ServerConfig, load_server_config
from fedmix_engine.federation.tokens import TOKENS_FILE, TOKENS_LOCK, TokenStore
from fedmix_engine.file_digest import file_sha256
from fedmix_engine.json_values import parse_json

GLOBAL_FILE = "global.safetensors"  # in a round's folder: the global pair it produced
MODEL_DIGEST = "model_sha256"  # in a round's meta.json: its GLOBAL_FILE's SHA-256 as written
CHANGES_FILE = "settings-changes.json"  # what each restart changed, from which round: the run's provenance
ID_FILE = "federation-id"  # sites keep their Adam moments per federation under this id
SERVER_LOCK = "server.lock"  # Windows: the running server's lock file (on POSIX it flocks the directory)
EVALUATIONS = "evaluations"  # <round>/<site>.json: the sites' held-out scores of that round's global model
# what a folder may hold before a federation starts in it: the tokens made for it ('token add' comes first)
_BEFORE_A_FEDERATION = {TOKENS_FILE, TOKENS_LOCK, SERVER_LOCK}


def refuse_foreign_folder(root: Path) -> None:
    """A new federation starts in a new or empty folder: 'serve --state' given a site folder, a simulate
    run or a --state one level too high (/srv/fedmix for /srv/fedmix/state) started one there, beside the
    patient images or beside the real federation, whose sites then met a new federation and model. The
    first 'token add' (before any serve) is held to the same rule: it wrote tokens.json there."""
    if (root / CONFIG_FILE).exists():
        return
    held = sorted(p.name for p in root.iterdir() if p.name not in _BEFORE_A_FEDERATION
                  and not p.name.startswith(".")) if root.is_dir() else []
    if held:
        raise InputError(root, f"is not a server state directory (no server.json) and not empty "
                               f"({first_names(held, 4)}): to "
                               "resume a federation, give the folder that holds its server.json; to start one, "
                               "give a new or empty folder (it may hold the sites' tokens)")


def round_dir(root: Path, r: int) -> Path:
    """Round ``r``'s folder in a state directory (0: the initial model)."""
    return root / "rounds" / f"{r:06d}"


def _active_sites(tokens: TokenStore) -> list[str]:
    return sorted(site for site, entry in tokens.sites().items() if not entry.get("revoked"))


def fewer_sites_than_expected(tokens: TokenStore, config: ServerConfig) -> str | None:
    """What to tell the admin when fewer sites hold tokens than a round waits for (None: enough, or none at
    all, which serve says otherwise): every round waits for its deadline, or, below the quorum, never closes.
    Not said at ``token add``, where it holds until the last site's token is made."""
    active = _active_sites(tokens)
    if not active or len(active) >= config.sites:
        return None
    if len(active) < config.min_sites:
        return (f"only {len(active)} site(s) hold tokens ({', '.join(active)}) and a round needs at least "
                f"{config.min_sites} (--min-sites {config.min_sites}): no round can close until more sites have "
                "tokens ('token add'), or serve is restarted with a lower --min-sites")
    return (f"{len(active)} sites hold tokens ({', '.join(active)}) and a round waits for {config.sites} (--sites "
            f"{config.sites}): every round waits for its deadline ({config.round_timeout:g} s) before it closes "
            f"with {len(active)}; restart serve with --sites {len(active)}, or add the other sites' tokens")


def more_sites_than_expected(tokens: TokenStore, config: ServerConfig) -> str | None:
    """What to tell the admin when more sites hold tokens than a round expects: a round closes as soon as
    ``--sites`` have uploaded, so the slowest site (often the one with the most images, or with masks) is
    left out of every round, and only its 409s said so; None when the numbers agree."""
    active = _active_sites(tokens)
    if len(active) <= config.sites:
        return None
    return (f"{len(active)} sites hold tokens ({', '.join(active)}), but a round closes as soon as {config.sites} "
            f"{'has' if config.sites == 1 else 'have'} uploaded (--sites {config.sites}): the slowest is left out "
            "of every round; restart serve with "
            f"--sites {len(active)} (it may change on a restart), or revoke the token of a site that no longer "
            "takes part")


def site_count_mismatch(tokens: TokenStore, config: ServerConfig, fewer: bool = True) -> str | None:
    """More sites with tokens than a round waits for, or (``fewer``) fewer: what to tell the admin, or None."""
    return more_sites_than_expected(tokens, config) or (fewer_sites_than_expected(tokens, config) if fewer else None)


def space_shortfall(root: Path, config: ServerConfig, last_round: int) -> str | None:
    """Why the rounds to come will not fit on the state directory's disk, or None: every round keeps its
    global model (a pair at the reference width is 138 MB: 100 rounds, 14 GB) and the open round holds an
    upload per site. ``serve`` says it at the start and ``status`` every time, rather than the disk filling
    mid-federation, when the server must refuse uploads until space is freed."""
    model = (round_dir(root, last_round) / GLOBAL_FILE).stat().st_size
    rounds_left = max(0, config.rounds - last_round)
    kept = min(rounds_left, config.keep_models + 1) if config.keep_models else rounds_left  # + the best-scored
    need = model * (kept + config.sites)
    free = shutil.disk_usage(root).free
    if rounds_left == 0 or need <= free:
        return None
    fewer = "" if config.keep_models else ", or keep fewer rounds' models (--keep-models K)"
    return (f"the {rounds_left} round(s) to come keep a global model of {_size(model)} each"
            f"{f' (the last {config.keep_models} of them)' if config.keep_models else ''} and, with the sites' "
            f"uploads, need up to {_size(need)}; the disk of {root} has {_size(free)} free: free space or move the "
            f"state directory to a larger disk now{fewer} (when the disk is full, the server refuses uploads until "
            "space is freed)")


def _size(n: float) -> str:
    unit, scale = next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= f), ("bytes", 1))
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n:.0f} {unit}"


def completed_rounds(root: Path) -> list[int]:
    """The committed rounds (0: the initial model), read only. A round is committed by renaming its complete
    directory into place, so its record says so; its model may have been removed since (``keep_models``)."""
    folder = root / "rounds"
    found = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()
                   and (p / "meta.json").exists()) if folder.is_dir() else []
    if not found:  # was an IndexError wherever the newest round was asked for
        raise InputError(folder, "holds no committed round, not even round 0 (the initial model): restore it from "
                                 "a backup of the state directory, or start the federation afresh with a new "
                                 "--state directory")
    return found


def model_digest(root: Path, r: int) -> str | None:
    """The SHA-256 of round ``r``'s model as it was written (None: a round recorded before digests, or a
    record that cannot be read, which :func:`read_history` names)."""
    try:
        digest = parse_json(round_dir(root, r).joinpath("meta.json").read_text()).get(MODEL_DIGEST)
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


MODEL_CHECKS = ("intact", "damaged", "unchecked", "removed", "missing")
# what is said of a round's model found so, after "round N's global model"
MODEL_PROBLEMS = {"damaged": "is damaged (its bytes are not those written: a failing disk, a restore gone wrong)",
                  "missing": "is missing"}


def newest_model_remedy(root: Path, r: int) -> str:
    """What to do when the newest round's model is missing or damaged: the server cannot go on from it."""
    folder = round_dir(root, r)
    return (f"restore it from a backup, or move {folder} (and evaluations/{folder.name}) out of the state "
            "directory and the server runs that round again")


def verify_models(root: Path) -> dict[str, list[int]]:
    """Every committed round's model checked against the SHA-256 its record holds, by rounds under each of
    ``MODEL_CHECKS``: intact, damaged (other bytes), unchecked (recorded before digests), removed (an older
    round's, by --keep-models) or missing (the newest round's, which is never removed). A start checks the
    newest alone; this reads every kept model whole, for a backup just restored or a disk in doubt."""
    found: dict[str, list[int]] = {kind: [] for kind in MODEL_CHECKS}
    completed = completed_rounds(root)
    for r in completed:
        found[model_check(root, r, newest=r == completed[-1])].append(r)
    return found


def model_check(root: Path, r: int, newest: bool) -> str:
    """Round ``r``'s model file as one of ``MODEL_CHECKS`` (reads it whole when its digest is recorded)."""
    path = round_dir(root, r) / GLOBAL_FILE
    if not path.exists():
        return "missing" if newest else "removed"
    recorded = model_digest(root, r)
    if recorded is None:
        return "unchecked"
    try:
        return "intact" if file_sha256(path) == recorded else "damaged"
    except FileNotFoundError:  # removed while read: by a running server's --keep-models, or the newest gone
        return "missing" if newest else "removed"


def upload_intact(root: Path, site: str, sha256: str) -> bool:
    """Whether ``site``'s acknowledged update of the open round is still the file that was validated and
    acknowledged (its report's SHA-256); a removed file is not."""
    try:
        return file_sha256(root / "current" / f"{site}.safetensors") == sha256
    except FileNotFoundError:
        return False


def upload_reports(root: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """Each site's acknowledged upload report in ``current/`` (None: damaged, not a report), in site order;
    one removed between listing and reading (a running server closed the round) is skipped."""
    for report in sorted((root / "current").glob("*.json")):
        if report.name == "opened.json":
            continue
        try:
            info = upload_report(report)
        except FileNotFoundError:
            continue
        yield report.stem, info


def verify_uploads(root: Path) -> dict[str, list[str]]:
    """The open round's acknowledged updates checked as a close or a start checks them, by sites under
    ``intact`` and ``damaged`` (a report that is not one, or weights that are not those acknowledged)."""
    found: dict[str, list[str]] = {"intact": [], "damaged": []}
    open_round_number = completed_rounds(root)[-1] + 1
    for site, info in upload_reports(root):
        if info is not None and info["round"] != open_round_number:
            continue  # left over from a committed round (a crash while its files were removed)
        if info is not None and upload_intact(root, site, info["sha256"]):
            found["intact"].append(site)
        elif (root / "current" / f"{site}.json").exists():  # else a running server closed the round meanwhile
            found["damaged"].append(site)
    return found


def read_history(root: Path, completed: list[int]) -> list[dict[str, Any]]:
    """Each completed round's record (``meta.json``: reason, weights, n, ℓ per site); a damaged one is named
    with what to do, not read as a history the sites' clients and the admin page would trip over."""
    return [_round_record(round_dir(root, r) / "meta.json", r, newest=r == completed[-1])
            for r in completed if r > 0]


def _round_record(path: Path, round_number: int, newest: bool) -> dict[str, Any]:
    try:
        meta = parse_json(path.read_text())
        sites = meta.get("sites") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("round") != round_number or not isinstance(meta.get("reason"), str):
            raise ValueError(f"not the record of round {round_number}")
        if not isinstance(sites, dict) or not all(
                isinstance(i, dict) and all(isinstance(i.get(k), int | float) for k in ("n", "loss", "weight"))
                for i in sites.values()):
            raise ValueError("its sites lack n, loss or weight")
    except ValueError as exc:  # JSON and UTF-8 decoding errors are ValueErrors too
        again = (f"; or move rounds/{path.parent.name} and evaluations/{path.parent.name} (if there) out of the state "
                 f"directory, and the server runs round {round_number} again from round {round_number - 1}'s model"
                 if newest else "")
        raise InputError(path, f"damaged round record ({exc}): restore it from a backup of the state "
                               f"directory{again}") from None
    return meta


def read_settings_changes(root: Path) -> list[dict[str, Any]]:
    """``settings-changes.json`` (``[]`` before any change), or an error naming it. It is only the run's
    provenance, so moving it away loses no training."""
    path = root / CHANGES_FILE
    if not path.exists():
        return []
    try:
        changes = parse_json(path.read_text())
        if not isinstance(changes, list) or not all(
                isinstance(c, dict) and isinstance(c.get("from_round"), int) and isinstance(c.get("at"), str)
                and isinstance(c.get("changes"), list) for c in changes):
            raise ValueError("not a list of records with from_round, at and changes")
    except ValueError as exc:
        raise InputError(path, f"damaged record of changed settings ({exc}): restore it from a backup, or move it "
                               "out of the state directory (it only records what earlier restarts changed)") from None
    return changes


def read_federation_id(root: Path) -> str | None:
    """The federation's id (None: a state directory from before ids). The server only ever writes a
    uuid4's 32 hex digits, and the sites name their optimiser state by it, so anything else is damage: a
    shortened id would silently start every site's optimiser afresh; a garbled one would stop every site."""
    path = root / ID_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text().strip()
    except ValueError:
        text = None
    if text is None or not re.fullmatch(r"[0-9a-f]{32}", text):
        raise InputError(path, "damaged federation id (not 32 hex digits): restore it from a backup; or delete it, "
                               "and the federation gets a new id: every site's optimiser then starts afresh at its "
                               "next round (only Adam's moments are lost)")
    return text


def upload_report(path: Path) -> dict[str, Any] | None:
    """An acknowledged upload's report (``current/<site>.json``); None when it is not one."""
    try:
        info = parse_json(path.read_text())
    except ValueError:
        return None
    fields = {"round": int, "sha256": str, "n": int, "loss": int | float}
    ok = isinstance(info, dict) and all(isinstance(info.get(k), t) for k, t in fields.items())
    return info if ok else None


def read_evaluations(root: Path) -> dict[int, dict[str, EvaluationReport]]:
    """The sites' held-out scores per round; a file that is not a report (a hand edit) is named."""
    found: dict[int, dict[str, EvaluationReport]] = {}
    for path in sorted((root / EVALUATIONS).glob("[0-9]*/*.json")):  # each written atomically
        try:
            report = EvaluationReport.from_dict(parse_json(path.read_text()))
        except (ValueError, InputError) as exc:
            raise InputError(path, f"not an evaluation report ({exc}); move it out of the state directory "
                                   "to start") from None
        found.setdefault(int(path.parent.name), {})[path.stem] = report
    return found


def evaluation_summaries(evaluations: dict[int, dict[str, EvaluationReport]]) -> list[dict[str, Any]]:
    """Per round: the pooled figures (classes named as the first site in name order names them) and each
    site's report."""
    out = []
    for r, by_site in sorted(evaluations.items()):
        ordered = dict(sorted(by_site.items()))
        out.append({"round": r, **pooled(ordered), "sites": {s: e.to_dict() for s, e in ordered.items()}})
    return out


def open_round(opened_at: float | None, now: float, round_timeout: float, uploaded: list[str],
               sites: dict[str, dict] | None, history: list[dict]) -> dict[str, Any]:
    """Why a round is still open, for its admin: for how long (``open_for``, s), when its deadline falls
    (``deadline_in``, s; negative once passed), and which sites with a token (not revoked) have not uploaded
    to it (``not_uploaded``), each with the last round it took part in (None: none yet). All None for a
    finished federation (``opened_at`` None); ``not_uploaded`` None when the tokens could not be read."""
    if opened_at is None:
        return {"open_for": None, "deadline_in": None, "not_uploaded": None}
    last_round = {site: meta["round"] for meta in history for site in meta["sites"]}
    missing = None if sites is None else [{"site": site, "last_round": last_round.get(site)}
                                          for site, entry in sorted(sites.items())
                                          if not entry.get("revoked") and site not in uploaded]
    return {"open_for": round(now - opened_at, 1), "deadline_in": round(opened_at + round_timeout - now, 1),
            "not_uploaded": missing}


def token_sites(tokens: TokenStore) -> dict[str, dict] | None:
    """The sites with a token; None when the token file cannot be read (``status`` run by another user, or
    the file damaged: ``token list`` names the fault)."""
    try:
        return tokens.sites()
    except (OSError, ValueError):
        return None


def read_status(root: str | Path, now: float | None = None) -> dict[str, Any]:
    """What ``/v1/status`` says, read from the state directory without writing to it: for an admin on the
    server's machine, whether the server runs or not (``fedmix-engine status``)."""
    root = Path(root)
    config = load_server_config(root / CONFIG_FILE) if (root / CONFIG_FILE).is_file() else None
    if config is None or not (root / "rounds").is_dir():
        if config is None and (root / TOKENS_FILE).is_file():  # 'token add' made the folder; serve has not run
            sites = sorted(site for site, entry in (token_sites(TokenStore(root)) or {}).items()
                           if not entry.get("revoked"))
            held = f" (tokens of {len(sites)} site(s): {first_names(sites, 4)})" if sites else ""
            raise InputError(root, f"no federation here yet{held}: 'fedmix-engine serve --state {root}' starts it")
        if not root.exists():  # a typing error, most often: said as such, not as a folder of the wrong kind
            raise InputError(root, "no such folder: give the folder 'serve --state' was started with")
        raise InputError(root, "not a server state directory (no server.json or rounds/)")
    completed = completed_rounds(root)
    last = completed[-1]
    uploaded = [site for site, info in upload_reports(root) if info is not None and info["round"] == last + 1]
    history = read_history(root, completed)
    return {"federation": read_federation_id(root),
            "round": None if last >= config.rounds else last + 1, "last_round": last, "rounds": config.rounds,
            "finished": last >= config.rounds, "sites_expected": config.sites, "min_sites": config.min_sites,
            "uploaded": uploaded, **open_round(None if last >= config.rounds else round_opened_at(root, last + 1),
                                               time.time() if now is None else now, config.round_timeout, uploaded,
                                               token_sites(TokenStore(root)), history),
            "method": config.method, "lam": config.lam, "beta": config.beta,
            "class_names": list(config.class_names), "history": history,
            "settings_changes": read_settings_changes(root),
            "evaluations": evaluation_summaries(read_evaluations(root))}


def round_opened_at(root: Path, round_number: int) -> float | None:
    """When round ``round_number`` opened (``current/opened.json``); None when the file is for another round,
    or damaged (the round's deadline then starts again, as when the file could not be written)."""
    try:
        opened = parse_json((root / "current" / "opened.json").read_text())
        at = float(opened["opened_at"]) if opened.get("round") == round_number else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return at if at is not None and math.isfinite(at) else None

