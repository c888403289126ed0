"""``fedmix-engine``: the command line of the engine. Each subcommand parses, calls one engine
function, and prints; bad input exits with status 2 and a message naming the file or field."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from fedmix_engine import __version__
from fedmix_engine.errors import InputError, SettingsDiffer
from fedmix_engine.json_values import parse_json


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """Append an option's default to its help, unless the help already says it or there is none to say;
    descriptions and epilogs keep their lines (the overview's workflow is a list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's ``--help`` shows defaults; subparsers inherit the class from their parent."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)


# ------------------------------------------------------------------ site commands
def cmd_site_init(args: argparse.Namespace) -> int:
    from fedmix_engine.data.site_store import SiteStore

    with SiteStore.create(args.dir, args.classes, name=args.name, channels=args.channels) as store:
        print(f"created site '{store.config.name}' in {args.dir} with classes: {', '.join(store.config.classes)}")
    return 0


def cmd_site_import(args: argparse.Namespace) -> int:
    from fedmix_engine.cli_training import clear_progress_bar, progress_bar
    from fedmix_engine.data.importer import import_sources_steps, read_sources
    from fedmix_engine.data.site_store import CONFIG_FILE, SiteStore
    from fedmix_engine.steps import run_steps

    sources = read_sources(args.images, args.masks, args.boxes, args.tags, args.coco, args.key)  # before a site is made
    is_site = (Path(args.dir) / CONFIG_FILE).exists()
    if args.images is None and not is_site:
        raise InputError("--images", f"{args.dir} is not a site yet: a new site's import needs its --images")
    classes = args.classes
    if not classes and not is_site and sources.coco is not None and sources.coco.categories:
        classes = list(sources.coco.categories)  # the categories annotated, in the file's id order
        print(f"classes (from {sources.coco.path}'s categories, in label order): {', '.join(classes)}")
    if not classes and not Path(args.dir).exists():  # a folder of something else: 'not a site folder'
        raise InputError("--classes", f"{args.dir} is not a site yet: to create it with this import, name its "
                                      "classes in label order (e.g. --classes lesion)")
    if not is_site and classes:
        store = SiteStore.create(args.dir, classes, channels=args.channels or 1)
    else:
        store = SiteStore.open(args.dir)
        if args.channels and args.channels != store.config.channels:
            store.close()
            raise InputError("--channels", f"the site in {args.dir} holds {store.config.channels}-channel images; "
                                           "--channels applies when import creates a site")
    with store:
        report = run_steps(import_sources_steps(store, sources, author=args.author, replace=args.replace),
                           lambda step: progress_bar(step.done, step.total, step.stage))
    clear_progress_bar()
    for line in report.lines():
        print(line)
    return 1 if report.problems else 0


def cmd_site_info(args: argparse.Namespace) -> int:
    from fedmix_engine.data.importer import SHOWN_PROBLEMS, listed
    from fedmix_engine.data.network_share import ADVICE, is_network_path
    from fedmix_engine.data.site_store import SiteStore

    with SiteStore.open(args.dir, readonly=True) as store:
        counts = store.summary()
        problems = store.problems()
        print(f"site: {store.config.name}  ({store.root})")
        if is_network_path(store.root):
            print(f"{ADVICE} (docs/site-format.md)")
        print(f"classes: {', '.join(store.config.classes)}  channels: {store.config.channels}")
        print(f"images: {counts['images']}")
        print(f"  mask-supervised: {counts['mask']}")
        per_class = store.class_counts()
        several = len(per_class) > 1
        boxes = ": " + " · ".join(f"{c} {k['boxes']}" for c, k in per_class.items()) if several else ""
        tags = " · ".join(f"{c + ' ' if several else ''}{k['present']} present, {k['absent']} absent"
                          for c, k in per_class.items())
        print(f"  box-supervised:  {counts['box']}  (boxes: {counts['boxes']}{boxes})")
        print(f"  tag-supervised:  {counts['tag']}  (tags: {counts['tags']}: {tags})")
        print(f"  unlabelled:      {counts['none']}")
        calibrated = sum(store.spacing(image_id) is not None for image_id in store.image_ids())
        print(f"pixel spacing (mm): {calibrated} of {counts['images']} images"
              + (" (evaluate gives HD95 in mm for these)" if calibrated else ""))
        copies, unknown = store.kept_copies()
        head = (f"copies (the pixels of an image imported before; both train): {len(copies)}"
                + (f" (not known for {unknown} image(s) an earlier napari-fedmix imported: the next import that "
                   "adds an image reads them once)" if unknown else ""))
        for line in listed(head, [f"{copy} = {first}" for copy, first in copies.items()], SHOWN_PROBLEMS) or [head]:
            print(line)
        print(f"problems: {len(problems)}")
        for p in problems:
            print(f"  {p}")
        if args.images:
            print("images (id, supervision, height×width, imported from):")
            for record in store.records():
                print(f"  {record.id}  {record.supervision}  {record.height}×{record.width}  {record.source}")
        models = _site_model_lines(store.root)
        print("models:" if models else "models: none yet (train in napari, or join a federation)")
        for line in models:
            print(f"  {line}")
    return 1 if problems else 0


def cmd_site_remove(args: argparse.Namespace) -> int:
    from fedmix_engine.data.removal import remove_images
    from fedmix_engine.data.site_store import SiteStore

    with SiteStore.open(args.dir) as store:
        removal = remove_images(store, args.images)
    for line in removal.lines():
        print(line)
    return 0


def cmd_site_export(args: argparse.Namespace) -> int:
    from fedmix_engine.cli_training import clear_progress_bar, progress_bar
    from fedmix_engine.data.export import export_site
    from fedmix_engine.data.site_store import SiteStore

    with SiteStore.open(args.dir, readonly=True) as store:
        report = export_site(store, args.out, images=args.images, pseudonymise=args.pseudonymise,
                             progress=lambda step: progress_bar(step.done, step.total, "images"))
    clear_progress_bar()
    for line in report.lines():
        print(line)
    return 1 if report.problems else 0


def _site_model_lines(site: Path) -> list[str]:
    """A line per model the site holds, marking the one prediction takes."""
    import time

    from fedmix_engine.safetensors_layout import read_header
    from fedmix_engine.site_models import GLOBAL_MODEL, LOCAL_MODEL, newest_site_model

    newest, lines = newest_site_model(site), []
    for kind, name in (("federated", GLOBAL_MODEL), ("local", LOCAL_MODEL)):
        path = site / name
        if not path.is_file():
            continue
        try:
            meta = parse_json(read_header(path, str(path))[1].get("meta", "{}"))
            about = f"round {meta['round']}" if "round" in meta else "no round recorded"
        except (InputError, ValueError, OSError) as exc:
            about = f"unreadable: {exc.reason if isinstance(exc, InputError) else exc}"
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        mark = "  ← newest: what 'predict SITE' and napari's Predict take" if path == newest else ""
        lines.append(f"{kind + ':':<10} {name}  ({about}, written {written}){mark}")
    return lines


def cmd_make_sample(args: argparse.Namespace) -> int:
    from fedmix_engine.data.synthetic import make_sample

    make_sample(args.out, sites=args.sites, images=args.images, seed=args.seed, supervision=args.supervision,
                mix=args.mix, classes=args.classes, size=args.size, eval_images=args.eval_images, shift=args.shift,
                progress=print)
    manifest = Path(args.out) / "federation.json"
    print(f"wrote {args.sites} site(s) and evaluation data to {args.out} (manifest: {manifest})")
    return 0


def cmd_make_federation(args: argparse.Namespace) -> int:
    from fedmix_engine.data.federation_split import make_federation

    manifest = make_federation(args.sources, args.out, supervision=args.supervision, mix=args.mix, val=args.val,
                               test=args.test, seed=args.seed, split_into=args.split_into, progress=print)
    print(f"wrote {len(manifest['sites'])} site(s) and evaluation data to {args.out} "
          f"(manifest: {Path(args.out) / 'federation.json'}); run it: fedmix-engine simulate --sample {args.out}")
    return 0


# ------------------------------------------------------------------ parser
DESCRIPTION = """\
FedMix: federated segmentation of medical images with mixed supervision. Each site trains on its
pixel masks, bounding boxes and image-level tags; only model weights leave a site. Bad input exits
with status 2 and a message naming the file or field."""

WORKFLOWS = """\
where to start:
  a clinic site    fedmix-engine site init SITE --classes lesion
                   fedmix-engine site import SITE --images FOLDER [--masks F] [--boxes CSV] [--tags CSV]
                   fedmix-engine join --server URL --token-file F --site SITE
                   fedmix-engine evaluate SITE HELD_OUT_SITE   (its newest model on labelled cases)
  the aggregator   fedmix-engine token add SITE_NAME --state DIR   (once per site; give it the token)
                   fedmix-engine serve --state DIR --sites N --rounds R [--tls-cert C --tls-key K]
  a researcher     fedmix-engine make-sample OUT, then fedmix-engine simulate --sample OUT --method fedmix
  anyone           fedmix-engine predict CHECKPOINT|SITE IMAGES OUT;  fedmix-engine demo (all on this machine)
"COMMAND --help" gives a command's options; docs/ in the source tree has the formats and the method."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedmix-engine", description=DESCRIPTION, epilog=WORKFLOWS)
    parser.add_argument("--version", action="version", version=f"fedmix-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    site = sub.add_parser("site", help="create, import into, inspect, export and remove images from a site folder")
    site_sub = site.add_subparsers(dest="site_command", required=True, metavar="SITE_COMMAND")
    p = site_sub.add_parser("init", help="create an empty site folder")
    p.add_argument("dir", type=Path, help="the site folder to create (must not exist or be empty)")
    p.add_argument("--classes", type=_names, required=True, help="comma-separated class names, e.g. lesion")
    p.add_argument("--name", help="site name (default: the folder name)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="image channels: 1 grey, 3 RGB")
    p.set_defaults(func=cmd_site_init)

    p = site_sub.add_parser("import", help="import a folder of images, masks and box/tag tables")
    p.add_argument("dir", type=Path, help="site folder (created when --classes is given and it does not exist)")
    p.add_argument("--images", type=Path,
                   help="folder of images (tif, png, jpg, bmp, dcm, or DICOM files without a suffix); leave it "
                        "out to add masks, boxes or tags to the images the site already holds; its x_mask.png "
                        "beside x.png (BUSI's layout) are taken as masks")
    p.add_argument("--masks", type=Path, help="folder of label masks, matched to images by file stem")
    p.add_argument("--boxes", type=Path, help="CSV with columns image,class,y0,x0,y1,x1 (or the corners as "
                                              "x_min,y_min,x_max,y_max, or x,y,width,height; UTF-8, or Excel's "
                                              "'Unicode Text'); docs/site-format.md")
    p.add_argument("--coco", type=Path, help="a COCO annotation file (CVAT, Labelbox, Roboflow, VIA …): "
                                             "regions as masks, rectangles as boxes (docs/site-format.md)")
    p.add_argument("--tags", type=Path, help="CSV with columns image,class,present (present/absent), or image "
                                             "and a column per class")
    p.add_argument("--key", type=Path, help="the key of a pseudonymised export of this site (DIR/logs/export-…-key"
                                            ".csv): the masks and tables name its case-… images, annotated elsewhere")
    p.add_argument("--classes", type=_names, help="create the site with these classes if it does not exist")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="image channels of a site created with --classes: 1 grey (the default), 3 RGB")
    p.add_argument("--author", help="recorded with every annotation whose table row names no author (default: "
                                    "your user name)")
    p.add_argument("--replace", action="store_true",
                   help="the files' masks, boxes and tags replace the site's also where the site changed them after "
                        "the files were written (a correction in napari); without it those are kept and listed")
    p.set_defaults(func=cmd_site_import)

    p = site_sub.add_parser("info", help="counts per supervision kind, classes, copies, problems, models")
    p.add_argument("dir", type=Path, help="a site folder")
    p.add_argument("--images", action="store_true",
                   help="also list every image: its id, supervision, size and the file it was imported from")
    p.set_defaults(func=cmd_site_info)

    p = site_sub.add_parser("remove", help="take images out of a site, with their annotations")
    p.add_argument("dir", type=Path, help="a site folder")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="an image's id or the name of the file it was imported from (nothing is removed if one "
                        "is not in the site)")
    p.set_defaults(func=cmd_site_remove)

    p = site_sub.add_parser("export", help="write a site's masks, boxes and tags to a new folder, as import reads "
                                           "them")
    p.add_argument("dir", type=Path, help="a site folder")
    p.add_argument("out", type=Path, help="a new folder (or an empty one): masks/<id>_mask.tif, boxes.csv, tags.csv")
    p.add_argument("--images", action="store_true", help="also write the images, as images/<id>.tif")
    p.add_argument("--pseudonymise", "--pseudonymize", action="store_true",
                   help="for a folder that leaves the clinic: name the images case-001 … in a random order, name no "
                        "source file, and keep the key to the site's images in DIR/logs/ (mode 600)")
    p.set_defaults(func=cmd_site_export)

    p = sub.add_parser("make-sample", help="write a synthetic multi-site federation (ultrasound-like)")
    p.add_argument("out", type=Path, help="output folder: site-* folders and the eval/ tree")
    p.add_argument("--sites", type=int, default=3, help="number of sites (hospitals), each its own domain")
    p.add_argument("--images", type=int, default=60, help="training images per site")
    p.add_argument("--eval-images", type=int, default=20, help="validation and test images per site, each")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels, 32 to 2048")
    p.add_argument("--classes", type=int, default=1, choices=(1, 2), help="1: lesion; 2: lesion and cyst")
    p.add_argument("--shift", default="mild", choices=("mild", "strong"),
                   help="domain shift between sites: mild (gain, grain, lesion size) or strong (+ look-alike lobules)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--supervision", type=_names, help="one kind per site, e.g. mask,box,tag (the default)")
    group.add_argument("--mix", type=_floats, help="fractions of mask,box,tag images within every site")
    p.set_defaults(func=cmd_make_sample)

    p = sub.add_parser("make-federation", help="a mixed-supervision federation from real, fully labelled sites")
    p.add_argument("out", type=Path, help="output folder: one weakened site per source and the eval/ tree")
    p.add_argument("--from", dest="sources", type=Path, nargs="+", required=True,
                   help="fully labelled site folders (every image: a mask, or every class tagged absent), one a site")
    p.add_argument("--split-into", type=int, default=1, metavar="K",
                   help="deal one source's images at random into K sites (a one-centre dataset as K sites)")
    p.add_argument("--val", type=float, default=0.15, help="fraction of each site's images for validation")
    p.add_argument("--test", type=float, default=0.15, help="fraction of each site's images for the test")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of which images keep which label")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--supervision", type=_names, help="one kind per site, e.g. mask,box,tag (the default)")
    group.add_argument("--mix", type=_floats, help="fractions of mask,box,tag images within every site")
    p.set_defaults(func=cmd_make_federation)

    from fedmix_engine import cli_federation, cli_training

    cli_training.add_commands(sub)
    cli_federation.add_commands(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command that ran (``site import``'s, not ``fedmix-engine``'s)."""
    return _command(parser, args)[0]


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the command that ran and the words that name it (``["site", "import"]``)."""
    words: list[str] = []
    while (sub := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)) is not None:
        words.append(getattr(args, sub.dest))
        parser = sub.choices[words[-1]]
    return parser, words


def _read_intermixed(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None,
                     extras: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """argparse fills an optional positional (``token``'s SITE) at the first positional word it meets, with
    nothing when an option follows, so ``token add --state DIR site-a`` left ``site-a`` over as unknown. Such
    a command's own words are read again with options and positionals in any order."""
    command, words = _command(parser, args)
    if not any(not a.option_strings and a.nargs == "?" for a in command._actions):
        return args, extras
    argv = list(sys.argv[1:] if argv is None else argv)
    start = next((i + len(words) for i in range(len(argv)) if argv[i:i + len(words)] == words), None)
    if start is None:
        return args, extras
    again, left = command.parse_known_intermixed_args(argv[start:])
    return argparse.Namespace(**(vars(args) | vars(again))), left


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> NoReturn:
    """Unknown arguments refused by the command they were given to, with its usage and, for a mistyped
    option, the nearest one it has; argparse alone blames ``fedmix-engine`` and shows the overview's usage."""
    command = _command_parser(parser, args)
    options = [s for action in command._actions for s in action.option_strings if s.startswith("--")]
    hints = []
    for extra in extras:
        typed = extra.split("=", 1)[0]
        if typed.startswith("-") and (near := difflib.get_close_matches(typed, options, n=1, cutoff=0.6)):
            hints.append(f"{typed}: did you mean {near[0]}?")
    command.error("unrecognized arguments: " + " ".join(extras) + "".join(f"\n  {h}" for h in hints))


def _as_typed(exc: InputError, parser: argparse.ArgumentParser, args: argparse.Namespace) -> InputError:
    """A setting's error under the option the user typed (``--width``, not ``model.base_width``;
    ``--crop-size``, not ``crop_size``); any other error (a file, an option already) as it is."""
    from fedmix_engine.cli_federation import MODEL_OPTIONS, SERVER_OPTIONS, TRAIN_OPTIONS

    parser = _command_parser(parser, args)
    options = {action.dest for action in parser._actions if action.option_strings}
    fields = dict((*SERVER_OPTIONS, *MODEL_OPTIONS, *TRAIN_OPTIONS))

    def option(name: str) -> str | None:
        field = name.removeprefix("model.").removeprefix("train.").removeprefix("--").replace("-", "_")
        # a setting's field under its option (model name: --model); a command's own option as it is (--name)
        dest = next((d for d in (fields.get(field, field), field) if d in options), None)
        return f"--{dest.replace('_', '-')}" if dest else None

    if isinstance(exc, SettingsDiffer):  # each setting in the message by its option
        return InputError(exc.where, exc.describe(lambda name: option(name) or name))
    typed = option(exc.where)
    return InputError(typed, exc.reason) if typed else exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        args, extras = _read_intermixed(parser, args, argv, extras)
    if extras:
        _refuse_unknown(parser, args, extras)
    # tifffile logs its own warning for a corrupt file ("invalid offset to first page"); the file is
    # already named and skipped or refused by our message, so on the command line it is noise
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:  # `... | head` read its lines and closed the pipe: how a listing is cut short
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + 13  # as a program that SIGPIPE ended (the shell's 141)
    except InputError as exc:
        print(f"error: {_as_typed(exc, parser, args)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine, not the input: a full disk, a share gone away; said, not traced back
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} ({type(exc).__name__})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
