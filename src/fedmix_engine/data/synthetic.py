"""Synthetic multi-site federations that look like breast ultrasound, for demos, tests and benchmarks.

Each image: layered tissue (skin line, fat lobules, glandular texture, muscle) attenuated with
depth, multiplicative speckle blurred by an anisotropic point-spread function, and 0–2
lesions. Class ``lesion`` is hypo-echoic with an irregular (harmonic-perturbed) outline and,
often, posterior acoustic shadowing; in the 2-class variant class ``cyst`` is round,
anechoic and shows posterior enhancement. Sites differ in gain, contrast (gamma), speckle
strength and lesion size: the domain shift that makes federation worthwhile.

``shift="strong"`` adds what a change of gain and grain does not: *look-alikes*. Fat lobules are
hypo-echoic too; a mask site whose images hold few of them (a referral centre imaging the lesion
up close) teaches "dark blob = lesion", and the model then fires on every lobule of a site that
images wide fields full of them. Only labels from those sites can correct it — and boxes (all
background outside) and "absent" tags are exactly such labels, which is the premise of mixed
supervision this preset lets a benchmark test.

Ground truth a real site would not have goes to ``OUT/eval/<site>/`` only, never into a weak
site's own store. Everything is a pure function of the seed: same seed, byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

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

SYNTHETIC_TIME = "2000-01-01T00:00:00+00:00"
CLASS_SETS = {1: ("lesion",), 2: ("lesion", "cyst")}
MAX_SAMPLE_SIZE = 2048  # px a side: a sample is for trying the tools, and its drawing holds float64 images


@dataclass(frozen=True)
class SiteDomain:
    """Acquisition settings of one synthetic site (its domain shift)."""

    gain: float  # overall brightness
    gamma: float  # contrast curve (>1 darkens mid-tones)
    speckle: float  # strength of multiplicative speckle
    lesion_radius: tuple[float, float]  # lesion radius range, as a fraction of the image size
    lesion_contrast: float  # lesion echogenicity relative to tissue (lower = darker)
    shadow_probability: float  # chance a solid lesion casts a posterior shadow
    psf: tuple[float, float] = (0.7, 1.6)  # speckle grain (axial, lateral σ in px): differs by probe
    lookalikes: float = 0.0  # mean number of hypo-echoic fat lobules (not lesions) per image


# Hand-chosen so that sites differ visibly; a 4th+ site interpolates between them.
_DOMAINS = (
    SiteDomain(1.00, 1.00, 0.55, (0.10, 0.20), 0.25, 0.5, (0.7, 1.6)),
    SiteDomain(1.35, 0.75, 0.80, (0.07, 0.14), 0.40, 0.7, (1.0, 2.2)),  # bright, washed out, coarse grain
    SiteDomain(0.70, 1.60, 1.10, (0.16, 0.30), 0.40, 0.2, (0.4, 0.8)),  # dark, fine grain, large lesions
)


# "strong": the same acquisition settings, plus look-alike lobules — rare at the first site (the
# mask site of the paper-like setting), frequent at the others. Chosen before any method was run on it.
_LOOKALIKES = (0.5, 3.0, 2.0)
SHIFTS = {
    "mild": _DOMAINS,
    "strong": tuple(replace(d, lookalikes=k) for d, k in zip(_DOMAINS, _LOOKALIKES, strict=True)),
}


def site_domain(index: int, rng: np.random.Generator, shift: str = "mild") -> SiteDomain:
    """Domain of the ``index``-th site: the three presets of ``shift``, then random mixtures of them."""
    if shift not in SHIFTS:
        raise InputError("--shift", f"unknown domain shift '{shift}'; use {' or '.join(SHIFTS)}")
    presets = SHIFTS[shift]
    if index < len(presets):
        return presets[index]
    a, b = rng.choice(len(presets), size=2, replace=False)
    t = float(rng.uniform(0.2, 0.8))
    da, db = presets[a], presets[b]

    def mix(x: float, y: float) -> float:
        return round((1 - t) * x + t * y, 4)

    return SiteDomain(mix(da.gain, db.gain), mix(da.gamma, db.gamma), mix(da.speckle, db.speckle),
                      (mix(*[d.lesion_radius[0] for d in (da, db)]), mix(*[d.lesion_radius[1] for d in (da, db)])),
                      mix(da.lesion_contrast, db.lesion_contrast), mix(da.shadow_probability, db.shadow_probability),
                      (mix(da.psf[0], db.psf[0]), mix(da.psf[1], db.psf[1])), mix(da.lookalikes, db.lookalikes))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return field / (field.std() + 1e-8)


def _lesion_shape(rng: np.random.Generator, size: int, radius: float, irregular: bool,
                  centre: tuple[float, float]) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = centre
    angle = np.arctan2(yy - cy, xx - cx)
    aspect = rng.uniform(0.6, 1.0)  # lesions are often wider than tall
    dist = np.hypot((yy - cy) / aspect, xx - cx)
    boundary = np.full_like(angle, radius)
    if irregular:
        for k in range(2, 7):
            boundary += radius * rng.uniform(0.0, 0.14 / (k - 1) ** 0.5) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return dist <= boundary


def _add_lookalikes(rng: np.random.Generator, tissue: np.ndarray, mask: np.ndarray, domain: SiteDomain,
                    fat_depth: float, gland_depth: float) -> np.ndarray:
    """Hypo-echoic fat lobules: as dark as this site's lesions, but smooth, homogeneous, wider than
    tall and without a shadow — separable by shape and texture once a model has seen them labelled
    as background. They stay clear of lesions and are never part of the mask."""
    size = tissue.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    keep_clear = ndimage.binary_dilation(mask > 0, iterations=3)
    for _ in range(int(rng.poisson(domain.lookalikes))):
        radius = rng.uniform(*domain.lesion_radius) * size  # as large as this site's lesions
        aspect = rng.uniform(0.45, 0.7)  # "parallel orientation", a benign sign
        cy = rng.uniform(fat_depth * size + radius * aspect, size * 0.8)  # interspersed in the gland, like lesions
        cx = rng.uniform(radius, size - radius)
        region = np.hypot((yy - cy) / aspect, xx - cx) <= radius
        if (region & keep_clear).any() or region.sum() < 4:
            continue
        soft = ndimage.gaussian_filter(region.astype(np.float64), 1.0)
        darkness = min(1.0, domain.lesion_contrast * rng.uniform(1.0, 1.5))  # iso- to mildly hypo-echoic
        tissue = tissue * (1 - soft) + tissue * darkness * soft
    return tissue


def synth_image(rng: np.random.Generator, size: int, domain: SiteDomain, num_classes: int = 1,
                lesion_free: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One ultrasound-like image (uint8 H×W) and its label mask (uint8, 0 = background)."""
    yy = np.linspace(0.0, 1.0, size)[:, None] * np.ones((1, size))
    # tissue layers: bright skin line, dark lobular fat, bright glandular texture, striated muscle
    fat_depth = rng.uniform(0.15, 0.3)
    gland_depth = fat_depth + rng.uniform(0.3, 0.45)
    tissue = np.where(yy < 0.05, 1.0, 0.0)
    lobules = _smooth_noise(rng, (size, size), size / 14)
    tissue += np.where((yy >= 0.05) & (yy < fat_depth), 0.35 + 0.12 * lobules, 0.0)
    gland = _smooth_noise(rng, (size, size), (size / 40, size / 16))
    tissue += np.where((yy >= fat_depth) & (yy < gland_depth), 0.7 + 0.15 * gland, 0.0)
    stripes = 0.5 + 0.1 * np.sin(yy * size / 3.0 + _smooth_noise(rng, (size, size), size / 10))
    tissue += np.where(yy >= gland_depth, stripes, 0.0)
    tissue *= np.exp(-0.6 * yy)  # depth attenuation (time-gain compensation is imperfect)

    mask = np.zeros((size, size), np.uint8)
    n_lesions = 0 if lesion_free else int(rng.choice([1, 1, 1, 2]))
    for _ in range(n_lesions):
        label = 1 if num_classes == 1 else int(rng.integers(1, num_classes + 1))
        radius = rng.uniform(*domain.lesion_radius) * size * (0.8 if label == 2 else 1.0)
        centre = (rng.uniform(fat_depth * size + radius * 0.5, size * 0.8),
                  rng.uniform(radius + 2, size - radius - 2))
        region = _lesion_shape(rng, size, radius, irregular=(label == 1), centre=centre)
        if (region & (mask > 0)).any():
            continue  # keep lesions apart, so each has its own box
        mask[region] = label
        soft = ndimage.gaussian_filter(region.astype(np.float64), 1.0)
        if label == 1:  # solid: hypo-echoic, heterogeneous, maybe posterior shadow
            inner = domain.lesion_contrast * (1.0 + 0.25 * _smooth_noise(rng, (size, size), 2.0))
            tissue = tissue * (1 - soft) + tissue * inner * soft
            if rng.random() < domain.shadow_probability:
                cols = ndimage.gaussian_filter1d(region.any(axis=0).astype(np.float64), radius / 4)
                below = (yy > centre[0] + radius * 0.6).astype(np.float64)
                tissue *= 1.0 - 0.55 * cols[None, :] * ndimage.gaussian_filter(below, 2.0)
        else:  # cyst: anechoic with posterior enhancement
            tissue = tissue * (1 - soft) + 0.04 * soft
            cols = ndimage.gaussian_filter1d(region.any(axis=0).astype(np.float64), radius / 4)
            below = (yy > centre[0] + radius).astype(np.float64)
            tissue *= 1.0 + 0.5 * cols[None, :] * ndimage.gaussian_filter(below, 2.0)

    if domain.lookalikes > 0:  # drawn only here, so "mild" images stay byte-identical
        tissue = _add_lookalikes(rng, tissue, mask, domain, fat_depth, gland_depth)

    # speckle: Rayleigh-distributed magnitude of a complex field blurred by a wide lateral PSF
    field = rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))
    field = ndimage.gaussian_filter(field.real, domain.psf) + 1j * ndimage.gaussian_filter(field.imag, domain.psf)
    speckle = np.abs(field)
    speckle /= speckle.mean()
    image = tissue * (1.0 + domain.speckle * (speckle - 1.0))
    image = np.clip(domain.gain * np.clip(image, 0, None) ** domain.gamma, 0, None)
    image = image / max(np.percentile(image, 99.5), 1e-6) * 0.9 * min(domain.gain, 1.2)
    image += 0.02 * rng.standard_normal((size, size))  # electronic noise
    return np.clip(image * 255, 0, 255).astype(np.uint8), mask


def make_sample(out: str | Path, sites: int = 3, images: int = 60, seed: int = 0,
                supervision: Sequence[str] | None = None, mix: Sequence[float] | None = None,
                classes: int = 1, size: int = 128, eval_images: int = 20, lesion_free: float = 0.15,
                shift: str = "mild", progress: Callable[[str], None] | None = None) -> dict:
    """Write a synthetic federation to ``out`` and return its manifest.

    ``OUT/site-a`` … are SiteStores holding only each site's own supervision; ``OUT/eval/site-x/``
    holds ``val`` and ``test`` stores with full ground truth and ``oracle`` (the site's training
    images fully labelled, for the supervised upper-bound baseline only). ``shift``: "mild" (gain,
    contrast, grain, lesion size) or "strong" (the same plus look-alike lobules; see the module doc).
    """
    out = Path(out)
    if sites < 1 or sites > 26:
        raise InputError("--sites", f"must be between 1 and 26, not {sites}")
    if images < 1:
        raise InputError("--images", f"needs at least one training image per site, not {images}")
    if eval_images < 1:
        raise InputError("--eval-images", f"needs at least one validation and one test image per site, not "
                                          f"{eval_images}")
    if not 32 <= size <= MAX_SAMPLE_SIZE:  # larger: gigabytes of float64 per image while drawing it
        raise InputError("--size", f"images must be 32 to {MAX_SAMPLE_SIZE} px, not {size}")
    if classes not in CLASS_SETS:
        raise InputError("--classes", f"synthetic data has 1 or 2 classes, not {classes}")
    check_seed(seed, "--seed")
    site_kinds = supervision_plan(sites, supervision, mix)
    if out.is_dir() and any(out.iterdir()):
        raise InputError(out, "output folder is not empty; choose a new folder")

    class_names = CLASS_SETS[classes]
    clock = lambda: SYNTHETIC_TIME  # noqa: E731 — fixed time keeps the files byte-identical per seed
    manifest: dict = {"seed": seed, "size": size, "classes": list(class_names), "shift": shift, "sites": []}
    for index in range(sites):
        name = f"site-{chr(ord('a') + index)}"
        rng = np.random.default_rng([seed, index])
        domain = site_domain(index, rng, shift)
        kinds = kinds_for_site(images, site_kinds[index], mix, rng)
        site = SiteStore.create(out / name, class_names, name=name, clock=clock)
        oracle = SiteStore.create(out / "eval" / name / "oracle", class_names, name=f"{name}-oracle", clock=clock)
        with site, oracle:
            for i, kind in enumerate(kinds):
                image, mask = synth_image(rng, size, domain, classes, lesion_free=rng.random() < lesion_free)
                image_id = f"{name}-{i:04d}"
                add_training_image(site, oracle, image_id, image, mask, kind, rng, author="synthetic")
            summary = site.summary()
        for split in ("val", "test"):
            split_rng = np.random.default_rng([seed, index, 1 if split == "val" else 2])
            with SiteStore.create(out / "eval" / name / split, class_names, name=f"{name}-{split}", clock=clock) as ev:
                for i in range(eval_images):
                    image, mask = synth_image(split_rng, size, domain, classes,
                                              lesion_free=split_rng.random() < lesion_free)
                    image_id = f"{name}-{split}-{i:04d}"
                    ev.add_image(image, image_id, author="synthetic")
                    store_ground_truth(ev, image_id, mask)
        manifest["sites"].append({"name": name, "supervision": site_kinds[index] or "mix", "domain": asdict(domain),
                                  "summary": summary})
        if progress:
            progress(f"{name}: {summary['images']} images ({supervision_counts(summary)})")
    if mix is not None:
        manifest["mix"] = list(mix)
    atomic_write_bytes(out / "federation.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
