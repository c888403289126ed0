"""Federation subcommands of ``fedmix-engine``: serve, join, token, demo, flower-app."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from fedmix_engine.atomic import write_refused
from fedmix_engine.errors import InputError

# Federation settings as (field, option) per part of ServerConfig. An option left out (None) keeps
# ServerConfig's default when the state directory is created, and the stored value on a restart
# (where only state.ADJUSTABLE ones may change).
SERVER_OPTIONS = (("sites", "sites"), ("min_sites", "min_sites"), ("round_timeout", "round_timeout"),
                  ("rounds", "rounds"), ("method", "method"), ("lam", "lam"), ("beta", "beta"), ("seed", "seed"),
                  ("max_upload_mb", "max_upload_mb"), ("keep_models", "keep_models"), ("class_names", "class_names"))
MODEL_OPTIONS = (("name", "model"), ("base_width", "width"), ("num_classes", "classes"), ("in_channels", "channels"))
TRAIN_OPTIONS = (("image_size", "image_size"), ("crop_size", "crop_size"), ("batch_size", "batch_size"),
                 ("epochs", "local_epochs"), ("lr", "lr"), ("pl_warmup_rounds", "pl_warmup"))
SETTINGS = tuple(option for part in (SERVER_OPTIONS, MODEL_OPTIONS, TRAIN_OPTIONS) for _, option in part)


def _given(args: argparse.Namespace, options: tuple[tuple[str, str], ...]) -> dict:
    return {field: getattr(args, option) for field, option in options if getattr(args, option) is not None}


def _server_config(args: argparse.Namespace, base):
    """``base`` (a ServerConfig: the defaults, or a state directory's stored settings) with the given options."""
    from dataclasses import replace

    from fedmix_engine.federation.server_config import parse_class_names
    from fedmix_engine.fedmix.train_config import default_crop_size

    server = _given(args, SERVER_OPTIONS)
    if "class_names" in server:
        server["class_names"] = parse_class_names(server["class_names"])
    if "min_sites" not in server:  # the default quorum shrinks with fewer sites; a given one is checked as given
        server["min_sites"] = min(base.min_sites, server.get("sites", base.sites))
    model = _given(args, MODEL_OPTIONS)
    if "class_names" in server and "num_classes" not in model:  # the names say how many classes there are
        model["num_classes"] = len(server["class_names"])
    train = _given(args, TRAIN_OPTIONS)
    if "image_size" in train and "crop_size" not in train:  # the crop follows a given image size
        train["crop_size"] = default_crop_size(train["image_size"])
    return replace(base, **server, model=replace(base.model, **model), train=replace(base.train, **train))


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is a number from 1 to 65535, not '{text}'")
    return int(text)


def _check_state_dir(state: Path, writes: bool = True) -> None:
    """A --state the server could not write is refused before it starts: it would start, answer every
    status request, and refuse every upload (a file system remounted read-only, another user's folder).
    A command that only reads it (``status``, ``token list``: ``writes=False``) needs no more than a folder:
    an admin reads a read-only state, or the service account's, to see what went wrong."""
    if not state.exists():
        return  # a new one: make_folder names a folder it cannot create
    if not state.is_dir():
        raise InputError(state, "is a file, not a server state directory (--state names a folder)")
    for folder in [state, *(sub for sub in sorted(state.iterdir()) if sub.is_dir())] if writes else []:
        if why := write_refused(folder):
            raise InputError(folder, f"the server cannot write here ({why}); it stores every upload and "
                                     "round in --state: run it as the folder's owner, fix the permissions, or "
                                     "remount the file system read-write")


def _check_tls(cert: str, key: str) -> None:
    """Load the certificate and key once before anything starts, so a missing file, a non-PEM file
    or a key of another certificate is named instead of surfacing as a traceback from uvicorn."""
    import ssl

    for path, what in ((Path(cert), "TLS certificate"), (Path(key), "TLS key")):
        if not path.is_file():
            raise InputError(path, f"{what} not found" if not path.exists() else f"is not a {what} file")
    try:  # an empty password: an encrypted key fails here instead of prompting on a headless server
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise InputError(cert, f"certificate and key {key} do not load as a PEM pair ({exc.reason or exc}); "
                               "both must be PEM, the key unencrypted and belonging to this certificate") from None
    _warn_if_others_may_read(Path(key), "the server's TLS private key")
    _check_certificate_dates(Path(cert))


def _check_certificate_dates(cert: Path) -> None:
    """Refuse a certificate every site would refuse (expired, or not valid yet), and warn of one expiring
    soon (``certificates``)."""
    import time

    from fedmix_engine.federation.certificates import certificate_dates, expiry_warning, utc

    if (dates := certificate_dates(cert)) is None:
        return
    (not_before, not_after), now = dates, time.time()
    if now > not_after:
        raise InputError(cert, f"the certificate expired on {utc(not_after)}; every site refuses it: renew it")
    if now < not_before:
        raise InputError(cert, f"the certificate is valid only from {utc(not_before)}: this machine's clock is "
                               "wrong, or the certificate was made with a start date to come")
    if warning := expiry_warning(not_after, now):
        print(f"warning: {cert}: {warning}", file=sys.stderr)


def _check_address(host: str, port: int) -> None:
    """Bind the address once, as the server will (every address the host resolves to, SO_REUSEADDR, as
    asyncio's create_server does), before anything starts: a port in use ended in uvicorn's 'address
    already in use', exit 3, after the server had announced itself and made a new state directory."""
    import contextlib
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError("--host", f"'{host}' does not resolve ({exc.strerror}); give an address of this machine "
                                   "(0.0.0.0 for all of them)") from None
    with contextlib.ExitStack() as probes:
        for family, kind, proto, _, address in infos:
            probe = probes.enter_context(socket.socket(family, kind, proto))
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                why = {errno.EADDRINUSE: ("--port", f"{port} is in use on {address[0]} by another program (another "
                                                    "server?): stop it, or choose another --port"),
                       errno.EACCES: ("--port", f"{port} needs privileges on this machine (ports below 1024): use "
                                                "a port from 1024 up, e.g. 8765, or a reverse proxy on 443"),
                       errno.EADDRNOTAVAIL: ("--host", f"{host} is not an address of this machine: give one of its "
                                                       "addresses, or 0.0.0.0 for all of them")}
                field, message = why.get(exc.errno, ("--host", f"cannot listen on {host}:{port} ({exc.strerror})"))
                raise InputError(field, message) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from fedmix_engine.federation.server import serve
    from fedmix_engine.federation.server_config import CONFIG_FILE, ServerConfig, load_server_config

    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("--tls-cert", "give both --tls-cert and --tls-key, or neither")
    if args.tls_cert:
        _check_tls(args.tls_cert, args.tls_key)
    _check_state_dir(args.state)
    _check_address(args.host, args.port)
    given = any(getattr(args, k) is not None for k in SETTINGS)
    stored = Path(args.state) / CONFIG_FILE
    config = None
    if not stored.exists():
        config = _server_config(args, ServerConfig())
    elif given:  # the stored settings with what was given; the state refuses a change to a fixed one
        config = _server_config(args, load_server_config(stored))
    serve(args.state, args.host, args.port, args.tls_cert, args.tls_key, config, args.log_level, args.status_access)
    return 0


def _read_token_file(path: Path) -> str:
    """The token in ``--token-file`` (:func:`read_token_file`), with a warning when others may read it."""
    from fedmix_engine.federation.tokens import read_token_file

    token = read_token_file(path)
    _warn_if_others_may_read(path, "this site's token")
    return token


def _warn_if_others_may_read(path: Path, what: str) -> None:
    from fedmix_engine.federation.tokens import readable_by_others

    if warning := readable_by_others(path, what):
        print(f"warning: {warning}", file=sys.stderr)


REFUSED, GAVE_UP = 3, 4  # join's exit status: a refusal, which a restart cannot mend; a server silent through
# all the retries, which a later restart may find back (a service manager restarts on 4, not on 3)


def cmd_join(args: argparse.Namespace) -> int:
    from fedmix_engine.errors import GaveUp
    from fedmix_engine.federation import client as federation_client
    from fedmix_engine.federation.client import FederationClient, FederationError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    token = args.token or os.environ.get("FEDMIX_TOKEN", "")
    source = "--token" if args.token else "FEDMIX_TOKEN"
    if args.token:
        print("warning: a token given with --token shows in the process list to every user of this machine; "
              "prefer --token-file (mode 600) or FEDMIX_TOKEN", file=sys.stderr)
    if args.token_file:
        token, source = _read_token_file(Path(args.token_file)), args.token_file
    client = FederationClient(args.server, token, args.site, device=args.device, ca_cert=args.ca_cert,
                              poll_seconds=args.poll, held_out=args.eval, token_source=source,
                              give_up_after=federation_client.CHECK_PATIENCE if args.check else 3600.0)
    try:
        with client:
            if args.check:
                for line in client.iter_check():  # each as it passes: a failure follows what did pass
                    print(line, flush=True)
                print("check passed: the same command without --check takes part in the federation")
                return 0
            for event in client.iter_join():
                if event.kind not in ("training", "evaluating") or (event.progress and
                                                                     event.progress.step == event.progress.total):
                    print(event.message, flush=True)
    except FederationError as exc:
        print(f"error: {exc}")
        return GAVE_UP if isinstance(exc, GaveUp) else REFUSED
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from fedmix_engine.federation.tokens import TokenStore

    _check_state_dir(args.state, writes=args.action != "list")
    if args.action != "list" and not args.site:
        raise InputError("SITE", f"name the site: fedmix-engine token {args.action} SITE --state DIR")
    store = TokenStore(args.state)
    if args.action == "add":
        from fedmix_engine.federation.status import refuse_foreign_folder

        refuse_foreign_folder(Path(args.state))  # a site folder, or --state one level too high: nothing written
        replaced = args.site in store.sites()
        token = store.add(args.site)
        print(token, flush=True)  # alone on stdout, so 'token add SITE > site.token' writes a token file
        print(f"(token for site '{args.site}': shown once, stored hashed in {store.path}"
              f"{'; the earlier token of this site no longer works' if replaced else ''})", file=sys.stderr)
        if mismatch := _site_count_warning(store, Path(args.state), fewer=False):  # the last token may come later
            print(f"warning: {mismatch}", file=sys.stderr)
    elif args.action == "revoke":
        store.revoke(args.site)
        print(f"revoked the token of site '{args.site}'")
    else:
        sites = store.sites()
        if not sites:  # say so: a mistyped --state would otherwise look like a server without sites
            print(f"no site tokens in {args.state}", file=sys.stderr)
        for site, info in sorted(sites.items()):
            print(f"{site}\tcreated {info['created']}\t{'revoked' if info['revoked'] else 'active'}")
    return 0


def _site_count_warning(tokens, state: Path, fewer: bool = True) -> str | None:
    """Said when more sites hold tokens than the federation's rounds expect (its stored --sites), after a
    ``token add`` and in ``status``; in ``status`` (``fewer``) also when fewer do. A tokens file that cannot
    be read is ``status``'s to say."""
    from fedmix_engine.federation.server_config import CONFIG_FILE, load_server_config
    from fedmix_engine.federation.status import site_count_mismatch

    try:
        if not (state / CONFIG_FILE).exists():
            return None
        return site_count_mismatch(tokens, load_server_config(state / CONFIG_FILE), fewer)
    except (OSError, InputError):
        return None


def cmd_status(args: argparse.Namespace) -> int:
    from fedmix_engine.dice_text import shown_loss
    from fedmix_engine.federation.admin import model_summary, sites_expected
    from fedmix_engine.federation.server_config import CONFIG_FILE, load_server_config
    from fedmix_engine.federation.status import read_status, space_shortfall, verify_models, verify_uploads
    from fedmix_engine.federation.tokens import TokenStore
    from fedmix_engine.strict_json import strict_dumps

    _check_state_dir(args.state, writes=False)
    status = read_status(args.state)
    config = load_server_config(Path(args.state) / CONFIG_FILE)
    warnings = [] if status["finished"] else [
        warning for warning in (space_shortfall(Path(args.state), config, status["last_round"]),
                                _site_count_warning(TokenStore(args.state), Path(args.state))) if warning]
    models = verify_models(Path(args.state)) if args.verify else None
    uploads = verify_uploads(Path(args.state)) if args.verify else None
    verdict = 2 if models and (models["damaged"] or models["missing"] or uploads["damaged"]) else 0
    if args.json:
        verified = {"models": models, "uploads": uploads} if args.verify else {}
        print(strict_dumps({**status, "warnings": warnings, **verified}, indent=2))
        return verdict
    classes = ", ".join(status["class_names"]) or "not named"
    print(f"federation {status['federation']}: {status['method']} (λ={status['lam']:g}, β={status['beta']:g}), "
          f"classes {classes}; {sites_expected(status)}, quorum {status['min_sites']}")
    print(f"model: {model_summary(config)}")
    state = "finished" if status["finished"] else (f"round {status['round']} open{_open_for(status)}, uploaded: "
                                                    f"{', '.join(status['uploaded']) or 'none yet'}")
    print(f"rounds: {status['last_round']} of {status['rounds']} done; {state}")
    if not status["finished"]:
        print(_waiting(status))
    for warning in warnings:
        print(f"warning: {warning}")
    for change in status["settings_changes"]:
        print(f"settings changed from round {change['from_round']}: {'; '.join(change['changes'])}")
    scored = {e["round"]: e for e in status["evaluations"]}
    if 0 in scored:
        print(f"round 0 (initial model): held-out Dice {_held_out(scored[0])}")
    for meta in status["history"]:
        sites = "; ".join(f"{site} w={info['weight']:.2f} n={info['n']} ℓ={shown_loss(info['n'], info['loss'])}"
                          for site, info in sorted(meta["sites"].items())) or "no site"
        evaluation = scored.get(meta["round"])
        held_out = f"; held-out Dice {_held_out(evaluation)}" if evaluation else ""
        print(f"round {meta['round']}: {sites}{held_out} (closed: {meta['reason']})")
    if models:
        _say_verified(models, Path(args.state))
        _say_verified_uploads(uploads, Path(args.state), status["last_round"] + 1)
    return verdict


def _say_verified_uploads(uploads: dict[str, list[str]], state: Path, r: int) -> None:
    """``status --verify``'s line for the open round's acknowledged updates (none: no line), then each
    damaged one (on stderr): the server heals it, but the disk that damaged it is in doubt."""
    if not (uploads["intact"] or uploads["damaged"]):
        return
    counts = ", ".join(f"{len(uploads[kind])} {words}" for kind, words in (("intact", "intact"),
                                                                          ("damaged", "DAMAGED")) if uploads[kind])
    print(f"updates to round {r}: {counts}")
    for site in uploads["damaged"]:
        print(f"error: {state / 'current' / site}.safetensors: {site}'s acknowledged update to round {r} is damaged "
              "(its bytes, or its report, are not those acknowledged: a failing disk, a restore gone wrong): the "
              "server drops it before the round closes (or at its start), and the site sends a new one; check "
              "the disk", file=sys.stderr)


def _say_verified(models: dict[str, list[int]], state: Path) -> None:
    """``status --verify``'s lines: a count of each kind, then each damaged or missing model with its remedy
    (on stderr)."""
    from fedmix_engine.federation.status import GLOBAL_FILE, MODEL_PROBLEMS, newest_model_remedy, round_dir

    said = {"intact": "intact", "unchecked": "unchecked (recorded before digests)",
            "removed": "removed by --keep-models", "damaged": "DAMAGED", "missing": "MISSING"}
    counts = ", ".join(f"{len(models[kind])} {words}" for kind, words in said.items() if models[kind])
    print(f"models: {counts}")
    newest = max(r for rounds in models.values() for r in rounds)
    for r, problem in sorted({r: kind for kind in MODEL_PROBLEMS for r in models[kind]}.items()):
        path = round_dir(state, r) / GLOBAL_FILE
        remedy = ("the server makes it again from the seed at its next start" if r == newest == 0 else
                  newest_model_remedy(state, r) if r == newest else
                  "restore it from a backup, or delete it: it is kept for the record, no site is sent it")
        print(f"error: {path}: round {r}'s global model {MODEL_PROBLEMS[problem]}: {remedy}", file=sys.stderr)


def _open_for(status: dict) -> str:
    return "" if status["open_for"] is None else f" for {_duration(status['open_for'])}"


def _waiting(status: dict) -> str:
    """Who the open round waits for, and what closes it (every expected site, or a quorum at the deadline)."""
    from fedmix_engine.federation.admin import not_uploaded_list

    missing = status["not_uploaded"]
    if missing is None:
        who = ("sites not yet uploaded: unknown (tokens.json cannot be read: another user's, or damaged; "
               "'fedmix-engine token list' says which)")
    else:
        who = f"no upload yet from: {not_uploaded_list(missing) or 'none of the sites with a token'}"
    expected = status["sites_expected"]
    rule = f"closes when {expected} site{' has' if expected == 1 else 's have'} uploaded"
    left = status["deadline_in"]
    if left is None:
        return f"{who}; {rule}"
    if math.isinf(left):
        return f"{who}; {rule} (no deadline: --round-timeout inf)"
    if left >= 0:
        return f"{who}; {rule}, or at the deadline (in {_duration(left)}) with at least {status['min_sites']}"
    quorum = status["min_sites"]
    return (f"{who}; the deadline passed {_duration(-left)} ago: it closes as soon as {quorum} "
            f"{'has' if quorum == 1 else 'have'} uploaded")


def _duration(seconds: float) -> str:
    if seconds >= 72 * 3600:
        return f"{seconds / 86400:,.0f} days"
    return f"{seconds:.0f} s" if seconds < 90 else (f"{seconds / 60:.0f} min" if seconds < 5400
                                                     else f"{seconds / 3600:.1f} h")


def _held_out(evaluation: dict) -> str:
    """The pooled Dice, each site's, and for several classes each class's (the mean hides a class missed)."""
    from fedmix_engine.dice_text import per_class_text

    per_site = ", ".join(f"{site} {report['dice']:.3f}" for site, report in evaluation["sites"].items())
    per_class = per_class_text(evaluation.get("classes") or {})
    return f"{evaluation['dice']:.3f} over {evaluation['images']} images ({per_site}{'; ' if per_class else ''}" \
           f"{per_class})"


def cmd_demo(args: argparse.Namespace) -> int:
    from fedmix_engine.federation.local_demo import DemoStopped, run_demo

    try:
        run_demo(args.out, rounds=args.rounds, images=args.images, size=args.size, width=args.width, seed=args.seed)
    except DemoStopped as stopped:
        print(f"demo stopped by {stopped}: its server and sites are stopped; {args.out} keeps what they wrote",
              file=sys.stderr)
        return 128 + stopped.signum
    return 0


def cmd_flower_app(args: argparse.Namespace) -> int:
    import tomllib

    from fedmix_engine.federation.flower.app_dir import write_flower_app

    overrides = {}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InputError("--set", f"'{item}' is not key=value")
        try:  # a TOML value, as `flwr run --run-config` reads one (inf: no deadline); anything else a string
            overrides[key.strip()] = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = raw
    path = write_flower_app(args.dir, overrides)
    print(f"wrote {path}\nrun it: flwr run {args.dir} <connection>  (SuperLink and SuperNodes: docs/federation.md)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the aggregation server (resumes from --state after a restart)")
    p.add_argument("--state", type=Path, required=True, help="state directory (rounds, uploads, tokens)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8765, help="TCP port")
    p.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--status-access", default="sites", choices=("local", "sites", "public"),
                   help="who may read the round history (/v1/status and the admin page: site names, sample "
                        "counts, losses, weights): local (a browser on this machine, or through an SSH tunnel), "
                        "sites (local, and any site with its token), public (anyone who reaches the port)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's log level (info: one line per request)")
    group = p.add_argument_group("federation settings (stored when the state directory is created; a restart may "
                                 "change only --rounds, --sites, --min-sites, --round-timeout, --max-upload-mb, "
                                 "--keep-models)")
    group.add_argument("--sites", type=int, help="expected sites per round (default 3)")
    group.add_argument("--min-sites", type=int, help="quorum to close a round at its deadline (default 2)")
    group.add_argument("--round-timeout", type=float, help="seconds before a round may close on quorum (default 600)")
    group.add_argument("--rounds", type=int, help="rounds in the federation (default 10)")
    group.add_argument("--method", choices=("fedmix", "fedavg"),
                       help="fedmix: adaptive weights; fedavg: data-size weights (default fedmix)")
    group.add_argument("--lam", type=float, help="λ: weight of the loss term in FedMix's weights (default 10)")
    group.add_argument("--beta", type=float, help="β: exponent of the training loss in FedMix's weights (default 1.5)")
    group.add_argument("--seed", type=int, help="seed of the initial global model (default 0)")
    group.add_argument("--max-upload-mb", type=float, help="largest update accepted, in MB (default 512)")
    group.add_argument("--keep-models", type=int, metavar="K",
                       help="keep the global models of the last K rounds (and of the round the sites' held-out "
                            "scores rate best), 0 every round's; every round's record stays; a pair at width 64 is "
                            "138 MB a round (default 0)")
    group.add_argument("--model", metavar="NAME", help="the network: unet (the paper's), or one an installed package "
                                                       "offers (entry point group fedmix_engine.models; every site "
                                                       "needs that package too; docs/engine.md) (default unet)")
    group.add_argument("--width", type=int, help="U-Net base width (64 = reference; default 16)")
    group.add_argument("--classes", type=int, help="number of classes (default 1), or as many as --class-names")
    group.add_argument("--class-names", metavar="NAME[,NAME…]",
                       help="the classes in label order, e.g. lesion,cyst: a site whose classes differ in name or "
                            "order is refused at joining (label k must mean the same at every site), and the global "
                            "models name them; without them only the class count is checked (default none)")
    group.add_argument("--channels", type=int, choices=(1, 3), help="image channels: 1 grey, 3 RGB (default 1)")
    group.add_argument("--image-size", type=int, help="sites resize images to this side (default 128)")
    group.add_argument("--crop-size", type=int, help="random training crop, a multiple of 16; with --image-size "
                                                     "alone, 7/8 of it down to a multiple of 16 (default 112)")
    group.add_argument("--batch-size", type=int, help="training batch at every site (default 8)")
    group.add_argument("--local-epochs", type=int, help="epochs over a site's data per round (default 1)")
    group.add_argument("--lr", type=float, help="Adam learning rate at every site (default 0.001)")
    group.add_argument("--pl-warmup", type=int, help="rounds before pseudo-labels are used (default 0)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="the federation's rounds, site weights and held-out Dice, and the sites "
                                      "the open round waits for, read from the server's state directory (running "
                                      "or not)")
    p.add_argument("--state", type=Path, required=True, help="the server's state directory")
    p.add_argument("--json", action="store_true",
                   help="print the status as JSON (for a monitoring script): GET /v1/status's fields that the state "
                        "directory holds, and the warnings")
    p.add_argument("--verify", action="store_true",
                   help="also check every kept round's model against the SHA-256 recorded when it was written, "
                        "and the open round's acknowledged updates against theirs (reads each whole: for a backup "
                        "just restored, or a disk in doubt); exit 2 if one is damaged or the newest model is "
                        "missing")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("join", help="take part in a federation with this site's data",
                       epilog="exit status: 0 the federation finished (or --check passed); 2 bad input;\n"
                              "  3 the server refused (a token, a certificate, another join of the site): a restart\n"
                              "    does not mend it;\n"
                              "  4 the server did not answer through an hour of retries; 1 a failure of this machine\n"
                              "    (a full disk): a service manager may restart on these")
    p.add_argument("--server", required=True, help="e.g. https://fedmix.example-hospital.org:8765")
    p.add_argument("--token", help="this site's token (or FEDMIX_TOKEN, or --token-file)")
    p.add_argument("--token-file", type=Path, help="file holding this site's token")
    p.add_argument("--site", type=Path, required=True, help="this site's folder (its images never leave it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (an Apple GPU: only when named)")
    p.add_argument("--ca-cert", help="CA or self-signed certificate to trust for HTTPS, alone (without it: what this "
                        "machine trusts, e.g. a hospital CA its IT installed)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between status checks while waiting")
    p.add_argument("--check", action="store_true",
                   help="check the setup and stop, without training: the server reached, its certificate trusted, "
                        "the token taken, the site fitting the federation's model, the device (before the "
                        "federation starts)")
    p.add_argument("--eval", type=Path, metavar="DIR",
                   help="a fully labelled site folder this site does not train on: every global model is scored "
                        "there and the scores (image count, mean Dice and IoU per class) are sent to the server")
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("demo", help="a real local federation: server + 3 site processes on 127.0.0.1")
    p.add_argument("out", type=Path, nargs="?", default=Path("runs/demo"),
                   help="folder for the sample data, server state, logs and predictions.png")
    p.add_argument("--rounds", type=int, default=8, help="federated rounds")
    p.add_argument("--images", type=int, default=32, help="training images per site")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--width", type=int, default=8, help="U-Net base width")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample data and the model")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("flower-app", help="write a Flower App folder that runs FedMix on a Flower deployment")
    p.add_argument("dir", type=Path, help="the App folder to write (pyproject.toml with the run config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="run-config value, e.g. --set num-server-rounds=50 --set model-width=64 (repeatable)")
    p.set_defaults(func=cmd_flower_app)

    p = sub.add_parser("token", help="create, revoke or list site tokens")
    p.add_argument("action", choices=("add", "revoke", "list"),
                   help="add: create a site's token and print it once; revoke: refuse it from now on (its "
                        "update in the open round is left out); list: sites")
    p.add_argument("site", nargs="?", help="the site's name (for add and revoke)")
    p.add_argument("--state", type=Path, required=True, help="the server's state directory")
    p.set_defaults(func=cmd_token)
