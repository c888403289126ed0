"""The admin's HTML page: round history with site weights, n_k, ℓ_k and the held-out Dice the sites
report, as small inline SVG plots."""

from __future__ import annotations

import time
from html import escape
from typing import TYPE_CHECKING, Any

from fedmix_engine.federation.certificates import expiry_warning

if TYPE_CHECKING:
    from fedmix_engine.federation.server_config import ServerConfig

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


POOLED = "all sites"  # the held-out chart's line for the sites pooled
TEXT = "#888"  # readable on napari's dark theme and on the admin page's white
LEGEND_CHAR_PX = 6  # a generous average glyph width at font-size 10, so a legend name is not cut off


def sites_expected(status: dict) -> str:
    """'2 sites expected', and '1 site expected' for a hospital trying the server alone."""
    expected = status["sites_expected"]
    return f"{expected} site{'' if expected == 1 else 's'} expected"


def model_summary(config: ServerConfig) -> str:
    """What the sites train (a ServerConfig's network and training settings), for the admin to check
    at start and in ``status``: 'network unet, width 16, 1 class, 1 channel; sites train at 128 px …'."""
    model, train = config.model, config.train
    classes = f"{model.num_classes} class{'' if model.num_classes == 1 else 'es'}"
    channels = f"{model.in_channels} channel{'' if model.in_channels == 1 else 's'}"
    warmup = f", pseudo-labels from round {train.pl_warmup_rounds + 1}" if train.pl_warmup_rounds else ""
    return (f"network {model.name}, width {model.base_width}, {classes}, {channels}; sites train at "
            f"{train.image_size} px (crops {train.crop_size}, batch {train.batch_size}, {train.epochs} local "
            f"epoch{'' if train.epochs == 1 else 's'} a round, lr {train.lr:g}{warmup})")


def not_uploaded_list(missing: list[dict]) -> str:
    """The sites an open round has not heard from, each with the last round it took part in."""
    def last_in(round_number: int | None) -> str:
        return "in no round yet" if round_number is None else f"last in round {round_number}"

    return ", ".join(f"{m['site']} ({last_in(m['last_round'])})" for m in missing)


def svg_lines(series: dict[str, list[tuple[int, float]]], title: str, width: int = 360, height: int = 160) -> str:
    """A tiny line chart (one line per site) as inline SVG, its legend in a right margin as wide as the
    longest name (up to half the chart; a longer name is shortened with "…")."""
    series = {name: pts for name, pts in series.items() if pts}  # a series without points has no line to name
    points = [p for s in series.values() for p in s]
    if not points:
        return (f"<svg width='{width}' height='{height}'>"
                f"<text x='10' y='20' fill='{TEXT}'>{escape(title)}: no data</text></svg>")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(0.0, min(ys)), max(max(ys), 1e-9)
    pad = 30
    fits = (width // 2 - 6) // LEGEND_CHAR_PX
    names = {name: name if len(name) <= fits else name[:fits - 1] + "…" for name in series}
    right = max(pad, 6 + LEGEND_CHAR_PX * max(len(label) for label in names.values()))

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - pad - right)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
             f"aria-label='{escape(title)}'>",
             f"<text x='{pad}' y='14' font-size='12' fill='{TEXT}'>{escape(title)}</text>",
             f"<line x1='{pad}' y1='{height - pad}' x2='{width - right}' y2='{height - pad}' stroke='#999'/>",
             f"<text x='2' y='{sy(y1) + 4:.0f}' font-size='9' fill='{TEXT}'>{y1:.2g}</text>",
             f"<text x='2' y='{sy(y0) + 4:.0f}' font-size='9' fill='{TEXT}'>{y0:.2g}</text>"]
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{path}'/>")
        parts.append(f"<text x='{width - right + 4}' y='{20 + 12 * i}' font-size='10' fill='{colour}'>"
                     f"{escape(names[name])}</text>")
    parts.append("</svg>")
    return "".join(parts)


def render_admin_page(status: dict[str, Any]) -> str:
    from fedmix_engine.dice_text import shown_loss

    history = status["history"]
    weights: dict[str, list[tuple[int, float]]] = {}
    losses: dict[str, list[tuple[int, float]]] = {}
    counts: dict[str, list[tuple[int, float]]] = {}
    rows = []
    for meta in history:
        r = meta["round"]
        for site, info in meta["sites"].items():
            weights.setdefault(site, []).append((r, info["weight"]))
            if info["n"]:  # a site that trained on nothing has no loss to plot
                losses.setdefault(site, []).append((r, info["loss"]))
            counts.setdefault(site, []).append((r, info["n"]))
        cells = "; ".join(f"{escape(s)}: n={i['n']} ℓ={shown_loss(i['n'], i['loss'])} w={i['weight']:.2f}"
                          for s, i in sorted(meta["sites"].items()))
        rows.append(f"<tr><td>{r}</td><td>{len(meta['sites'])}</td><td>{cells}</td>"
                    f"<td>{escape(meta['reason'])}</td></tr>")
    held_out: dict[str, list[tuple[int, float]]] = {}
    for evaluation in status.get("evaluations", []):
        for site, report in evaluation["sites"].items():
            held_out.setdefault(site, []).append((evaluation["round"], report["dice"]))
        held_out.setdefault(POOLED, []).append((evaluation["round"], evaluation["dice"]))
    newest = status.get("evaluations", [])[-1:]
    scored = "".join(f"<p>Held-out Dice of round {e['round']}'s global model: <b>{e['dice']:.3f}</b> over "
                     f"{e['images']} images at {len(e['sites'])} site(s) "
                     f"({escape(', '.join(f'{c} {d:.3f}' for c, d in e['classes'].items()))}).</p>" for e in newest)
    changed = "".join(f"<li>from round {c['from_round']} ({escape(c['at'])}): {escape('; '.join(c['changes']))}</li>"
                      for c in status.get("settings_changes", []))
    changed = f"<p>Settings changed on restarts:</p><ul>{changed}</ul>" if changed else ""
    state = "finished" if status["finished"] else f"round {status['round']} open"
    waiting = ", ".join(status["uploaded"]) or "none yet"
    missing = status.get("not_uploaded")
    if not status["finished"] and missing:
        waiting += f"; not yet: {not_uploaded_list(missing)}"
    failure = status.get("close_failure")
    failing = (f"<p style='color:#b00'><b>Round {failure['round']} is due to close but cannot be</b>: "
               f"{escape(failure['error'])}. {escape(failure['advice'][:1].upper() + failure['advice'][1:])}; "
               "the server retries by itself."
               "</p>") if failure else ""
    damaged = status.get("model_failure")
    failing += (f"<p style='color:#b00'><b>No site can download the global model</b>: {escape(damaged['error'])}."
                "</p>") if damaged else ""
    expires = status.get("tls_expires_at")
    expiring = expiry_warning(expires, time.time()) if expires is not None else None
    renew = f"<p style='color:#b00'><b>Renew the TLS certificate</b>: {escape(expiring)}.</p>" if expiring else ""
    short = status.get("space_shortfall")
    renew += f"<p style='color:#b00'><b>Disk space</b>: {escape(short)}.</p>" if short else ""
    crowd = status.get("site_count")
    renew += f"<p style='color:#b00'><b>Sites</b>: {escape(crowd)}.</p>" if crowd else ""
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>FedMix server</title>
<meta http-equiv='refresh' content='10'>
<style>body{{font-family:sans-serif;margin:2em}}
td,th{{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}}</style>
</head><body>
<h1>FedMix aggregation server</h1>
<p><b>{escape(state)}</b> — {status['last_round']} of {status['rounds']} rounds done; method {escape(status['method'])}
(λ = {status['lam']}, β = {status['beta']}); {sites_expected(status)}, quorum {status['min_sites']}.
Uploaded this round: {escape(waiting)}.</p>
{f"<p>Model: {escape(status['model_summary'])}.</p>" if status.get('model_summary') else ""}
{failing}{renew}{changed}{scored}
<div>{svg_lines(held_out, "held-out Dice of each round's global model") if held_out else ""}
{svg_lines(weights, "site weight w_k per round")} {svg_lines(losses, "training loss ℓ_k per round")}
{svg_lines(counts, "samples used n_k per round")}</div>
<table><tr><th>round</th><th>sites</th><th>n, ℓ, weight per site</th><th>closed because</th></tr>
{''.join(reversed(rows))}</table>
<p>JSON: <a href='v1/status'>v1/status</a></p>
</body></html>"""
