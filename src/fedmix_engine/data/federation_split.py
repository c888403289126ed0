"""A mixed-supervision federation made from real, fully labelled sites (``make-federation``).

To reproduce the paper on real data (say BUSI, or each hospital's labelled scans), every source
site is split, with a seed, into training, validation and test images. The training images keep
only the supervision their site is given — the mask, boxes derived from it, or image-level tags
(``weak_labels``) — and the full ground truth goes to ``OUT/eval/<site>/{val,test,oracle}``: the
layout ``make-sample`` writes, so ``simulate --sample OUT`` and the benchmarks run on it unchanged.
Sites are named ``site-a``, ``site-b`` … in the order given; ``federation.json`` records each
one's source and which images went where.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fedmix_engine.atomic import atomic_write_bytes
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.data.weak_labels import (
    add_training_image,
    kinds_for_site,
    store_ground_truth,
    supervision_counts,
    supervision_plan,
)
from fedmix_engine.errors import InputError
from fedmix_engine.seeds import check_seed


def _full_truth(store: SiteStore, image_id: str) -> np.ndarray | None:
    """The image's complete label mask: its mask, all background if every class is tagged absent, else None."""
    mask = store.read_mask(image_id)
    if mask is not None:
        return mask
    tags = store.tags(image_id)
    if len(tags) == len(store.config.classes) and not any(tags.values()):
        record = store.record(image_id)
        return np.zeros((record.height, record.width), np.uint8)
    return None


def _split_sizes(n: int, val: float, test: float, where: Path) -> tuple[int, int, int]:
    n_val, n_test = max(1, round(val * n)), max(1, round(test * n))
    if n - n_val - n_test < 1:
        raise InputError(where, f"{n} fully labelled image(s) cannot give training, validation ({n_val}) and "
                                f"test ({n_test}) images; label more or lower --val/--test")
    return n - n_val - n_test, n_val, n_test


def _copies(store: SiteStore, ids: Sequence[str]) -> dict[str, list[str]]:
    """The images grouped by their pixels (digest → ids, in ``ids`` order): a group of more than one holds
    copies of one image under several names, as public datasets do (BUSI), which a split must not part."""
    digests = store.pixel_digests()
    groups: dict[str, list[str]] = {}
    for image_id in ids:
        groups.setdefault(digests[image_id], []).append(image_id)
    return groups


def _split_groups(groups: list[list[str]], sizes: tuple[int, int, int], rng: np.random.Generator
                  ) -> dict[str, list[str]]:
    """Training, validation and test images, a group of copies whole in one of them: groups in a random
    order fill training to its size, then validation, and the rest is test. Groups of one image each give
    exactly the image-by-image split of before."""
    n_train, n_val, _ = sizes
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i in rng.permutation(len(groups)):
        part = "train" if len(parts["train"]) < n_train else "val" if len(parts["val"]) < n_val else "test"
        parts[part].extend(groups[i])
    return parts


def _copies_across_sites(plans: list, names: list[str]) -> list[str]:
    """Lines naming the images of a site that copy an image of an earlier site: a split cannot keep them
    apart, and one may train the model while the other is scored as a test case."""
    first: dict[str, tuple[str, str]] = {}
    lines = []
    for name, (_, _, groups, _) in zip(names, plans, strict=True):
        found, earlier = [], set()
        for digest, group in groups.items():
            owner, first_image = first.setdefault(digest, (name, group[0]))
            if owner != name:
                found.extend(f"{image_id} = {first_image}" for image_id in group)
                earlier.add(owner)
        if found:
            lines.append(f"note: {name}: {len(found)} image{' is a copy' if len(found) == 1 else 's are copies'} "
                         f"of an image of {', '.join(sorted(earlier))} ({', '.join(found[:3])}"
                         f"{', …' if len(found) > 3 else ''}): one may train the model while the other is a test case")
    return lines


def make_federation(sources: Sequence[str | Path], out: str | Path, supervision: Sequence[str] | None = None,
                    mix: Sequence[float] | None = None, val: float = 0.15, test: float = 0.15, seed: int = 0,
                    split_into: int = 1, progress: Callable[[str], None] | None = None) -> dict:
    """Write ``OUT/site-a`` … and ``OUT/eval`` from fully labelled source sites; returns the manifest.

    ``split_into`` K > 1 deals one source's images at random into K sites of (nearly) equal size:
    a public dataset from one centre then stands for K sites without a domain shift between them.
    Everything is checked before anything is written: the sources open, share classes and channels,
    and every image has full ground truth (a mask, or every class tagged absent)."""
    out, sources = Path(out), [Path(s) for s in sources]
    if not sources:
        raise InputError("--from", "give at least one fully labelled site folder")
    if split_into < 1:
        raise InputError("--split-into", f"K sites per source must be ≥ 1 (1: each source is one site), not "
                                         f"{split_into}")
    if split_into > 1 and len(sources) != 1:
        raise InputError("--split-into", f"deals one source's images into K sites; give one --from folder, not "
                                         f"{len(sources)} (several sources are one site each without it)")
    if max(len(sources), split_into) > 26:
        raise InputError("--from", f"at most 26 sites (site-a … site-z), not {max(len(sources), split_into)}")
    if len({s.resolve() for s in sources}) != len(sources):
        raise InputError("--from", "a site folder is given twice")
    for name, fraction in (("--val", val), ("--test", test)):
        if not 0 < fraction < 1:
            raise InputError(name, f"a fraction of each site's images in (0, 1), not {fraction}")
    check_seed(seed, "--seed")
    if val + test >= 1:
        raise InputError("--test", f"--val {val} + --test {test} leave no training images")
    kinds_per_site = supervision_plan(max(len(sources), split_into), supervision, mix)
    if out.is_dir() and any(out.iterdir()):
        raise InputError(out, "output folder is not empty; choose a new folder")

    plans = []
    for source in sources:
        with SiteStore.open(source, readonly=True) as store:
            config = store.config
            if plans and (config.classes, config.channels) != (plans[0][1].classes, plans[0][1].channels):
                raise InputError(source, f"classes {list(config.classes)} and {config.channels} channel(s) differ "
                                         f"from {sources[0]}'s {list(plans[0][1].classes)} and "
                                         f"{plans[0][1].channels}")
            ids = store.image_ids()
            unlabelled = [i for i in ids if _full_truth(store, i) is None]
            copies = [] if unlabelled else list(_copies(store, ids).items())
        if unlabelled:
            raise InputError(source, f"{len(unlabelled)} image(s) without full ground truth (a mask, or every class "
                                     f"tagged absent), e.g. {', '.join(unlabelled[:3])}; make-federation needs "
                                     "fully labelled sites")
        if not ids:
            raise InputError(source, "the site holds no images")
        dealt = np.random.default_rng([seed, 1_000]).permutation(len(copies)) if split_into > 1 else \
            range(len(copies))
        for k in range(split_into):  # group i of the dealt order (an image and its copies) goes to site i mod K
            share = dict(sorted((copies[i] for j, i in enumerate(dealt) if j % split_into == k),
                                key=lambda item: min(item[1])))
            n = sum(map(len, share.values()))
            plans.append((source, config, share, _split_sizes(n, val, test, source)))

    manifest: dict = {"made_from": [str(s.resolve()) for s in sources], "seed": seed, "val": val, "test": test,
                      "classes": list(plans[0][1].classes), "sites": []}
    names = [f"site-{chr(ord('a') + index)}" for index in range(len(plans))]
    for index, (source, config, groups, sizes) in enumerate(plans):
        name = names[index]
        rng = np.random.default_rng([seed, index])
        parts = _split_groups([sorted(group) for group in groups.values()], sizes, rng)
        if not parts["test"]:
            raise InputError(source, "copies of one image (the same pixels under several names) are so many that "
                                     "no test image is left once each image's copies are kept together")
        n_train, n_val, copied = len(parts["train"]), len(parts["val"]), sum(len(g) - 1 for g in groups.values())
        kinds = kinds_for_site(n_train, kinds_per_site[index], mix, rng)
        classes, channels = config.classes, config.channels
        with SiteStore.open(source, readonly=True) as src, \
                SiteStore.create(out / name, classes, name=name, channels=channels) as site, \
                SiteStore.create(out / "eval" / name / "oracle", classes, name=f"{name}-oracle",
                                 channels=channels) as oracle:
            for image_id, kind in zip(parts["train"], kinds, strict=True):
                add_training_image(site, oracle, image_id, src.read_image(image_id), _full_truth(src, image_id), kind,
                                   rng, author="make-federation", spacing=src.spacing(image_id))
            summary = site.summary()
            for split in ("val", "test"):
                with SiteStore.create(out / "eval" / name / split, classes, name=f"{name}-{split}",
                                      channels=channels) as held_out:
                    for image_id in parts[split]:
                        held_out.add_image(src.read_image(image_id), image_id, author="make-federation",
                                           spacing=src.spacing(image_id))
                        store_ground_truth(held_out, image_id, _full_truth(src, image_id))
        manifest["sites"].append({"name": name, "source": str(source.resolve()),
                                  "supervision": kinds_per_site[index] or "mix", "summary": summary,
                                  "copies": copied, **parts})
        if progress:
            progress(f"{name} ← {source}: {n_train} training images ({supervision_counts(summary)}), "
                     f"{n_val} validation, {len(parts['test'])} test"
                     + (f"; {copied} {'copy' if copied == 1 else 'copies'} of other images kept in the same split"
                        if copied else ""))
    for line in _copies_across_sites(plans, names) if progress else []:
        progress(line)
    if mix is not None:
        manifest["mix"] = list(mix)
    atomic_write_bytes(out / "federation.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
