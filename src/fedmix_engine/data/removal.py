"""Take images out of a site, with their annotations: a patient who withdraws consent, a scan imported by
mistake, or an image whose file was corrected after import (the site keeps its own copy, so the new file is
imported only once the old copy is gone).

Images are named as everywhere else: by id or by the name of the file they were imported from. Every name
is resolved before anything is removed, so a typing error removes nothing, and the images' rows go in one
transaction: a removal killed part-way removed all or none of them, and the same command run again finishes it
(the files a kill after the commit left behind are deleted then). The lines of the site's import problem logs
and export keys that name them go too. Models the site trained before keep what they learnt from the images;
the training after the removal never sees them again.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedmix_engine.atomic import atomic_write_bytes
from fedmix_engine.data.export import KEY_SUFFIX
from fedmix_engine.data.imageio import image_stem
from fedmix_engine.data.importer import resolve_image, site_names
from fedmix_engine.data.site_store import LOGS, ImageRecord, SiteStore
from fedmix_engine.errors import InputError


@dataclass
class Removal:
    """What :func:`remove_images` took out of the site."""

    images: list[ImageRecord] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # ids whose removal a kill interrupted, finished now
    log_lines: int = 0  # lines of the import problem logs and export keys that named them, deleted
    sources_left: list[str] = field(default_factory=list)  # removed images' source files, still where they were

    @property
    def masks(self) -> int:
        return sum(record.has_mask for record in self.images)

    @property
    def boxes(self) -> int:
        return sum(record.boxes for record in self.images)

    @property
    def tags(self) -> int:
        return sum(len(record.tags) for record in self.images)

    def lines(self) -> list[str]:
        out = [f"removed {len(self.images)} image(s) with their annotations (masks: {self.masks}  boxes: "
               f"{self.boxes}  tags: {self.tags}):"] if self.images or not self.finished else []
        out.extend(f"  {record.id}" + (f"  (imported from {record.source})" if record.source else "")
                   for record in self.images)
        if len(self.images) == 1 and self.sources_left:
            out.append(f"its source file is still in place ({self.sources_left[0]}): an import of its folder adds it "
                       "again (a patient who withdrew consent: delete or move the file)")
        elif self.sources_left:
            out.append(f"{len(self.sources_left)} of them still have their source files in place: an import of "
                       "their folders adds them again (a patient who withdrew consent: delete or move the files):")
            out.extend(f"  {source}" for source in self.sources_left)
        if self.finished:
            out.append(f"finished the removal of {len(self.finished)} image(s) that an interrupted run had taken "
                       "out of the database but not off the disk (their files are deleted now):")
            out.extend(f"  {image_id}" for image_id in self.finished)
        if self.log_lines:
            out.append(f"deleted {self.log_lines} line(s) naming them from the import problem logs and export keys "
                       f"in {LOGS}/")
        out.append("models the site trained before keep what they learnt from them; training from now on "
                   "does not see them")
        return out


def images_named(store: SiteStore, names: list[str]) -> list[str]:
    """The ids of the images ``names`` give (ids, file names, or paths as a table would give them), each
    once, in the order named; also of the images whose removal a kill interrupted
    (:meth:`SiteStore.pending_removals`); any other name is refused with the site's names closest to it."""
    known = site_names(store) | {image_id: image_id for image_id in store.pending_removals()}
    ids: list[str] = []
    for name in names:
        image_id = resolve_image(known, name)
        if image_id is None:
            close = difflib.get_close_matches(name, list(known), n=3)
            raise InputError(name, f"no image of this name in the site {store.root}"
                             + (f"; similar: {', '.join(close)}" if close else "")
                             + f" (fedmix-engine site info {store.root} --images lists them)")
        if image_id not in ids:
            ids.append(image_id)
    return ids


def remove_images(store: SiteStore, names: list[str]) -> Removal:
    """Remove the images ``names`` give, with all their annotations (nothing, if one name is unknown)."""
    ids = images_named(store, names)
    held = {record.id: record for record in store.records()}
    removal = Removal([held[image_id] for image_id in ids if image_id in held],
                      [image_id for image_id in store.pending_removals() if image_id not in held])
    store.remove_images(ids)
    removal.log_lines = scrub_logs(store.root, [*removal.images, *removal.finished])
    removal.sources_left = [record.source for record in removal.images
                            if os.path.isabs(record.source) and os.path.isfile(record.source)]
    return removal


def finish_interrupted(store: SiteStore) -> Removal | None:
    """Finish the removals a kill left half done (their rows gone, their files maybe not), as the next removal
    would; None when there is none. napari calls it when it opens a site: a clinician there may never remove
    another image, and a withdrawn patient's pixels must not wait on the disk for one."""
    return remove_images(store, []) if store.pending_removals() else None


def scrub_logs(site: Path, removed: list[ImageRecord | str]) -> int:
    """Delete the lines of the site's import problem logs and export keys that name a removed image; returns
    how many. Those plain-text files outlived a removal, the source file's name often the patient's. A line
    names an image by the path of the file it came from, or by its id, or its file's name or stem, where a
    line gives one: quoted (``the boxes of 'case-07'``), a CSV field (a key's row), or a file name in a path
    (``…/masks/case-07_mask.png``); not as a word of the text, so removing an image named ``mask`` or
    ``case-1`` leaves the lines of the others."""
    names, sources = set(), set()
    for record in removed:
        names.add(record if isinstance(record, str) else record.id)
        if isinstance(record, ImageRecord) and os.path.isabs(record.source):
            sources.add(record.source)
            names.update((Path(record.source).name, image_stem(record.source)))
    naming = re.compile("|".join([*(re.escape(source) for source in sources), *(
        rf"['\"]{name}['\"]|(?:^|,){name}(?:,|$)|(?<=[/\\]){name}(?=[._ :-]|$)"
        for name in map(re.escape, sorted(names, key=len, reverse=True)))]), re.MULTILINE)
    deleted = 0
    logs = [*(site / LOGS).glob("import-*-problems.txt"), *(site / LOGS).glob(f"export-*{KEY_SUFFIX}")]
    for log in sorted(logs) if names else []:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = [line for line in lines if not naming.search(line)]
        if len(kept) < len(lines):
            deleted += len(lines) - len(kept)
            if kept:
                atomic_write_bytes(log, "".join(kept).encode())
            else:
                log.unlink()
    return deleted
