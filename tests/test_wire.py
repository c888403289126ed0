"""The wire format: updates read back exactly, one tensor at a time; malformed bodies refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from federation_helpers import with_header
from fedmix_engine.errors import InputError
from fedmix_engine.federation.wire import LazyUpdate, UpdateReport, encode_update, read_header, validate_update_file


def test_lazy_update_reads_every_dtype_exactly(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    lazy = LazyUpdate(tmp_path / "x.safetensors")
    assert set(lazy) == set(tensors)
    for key, value in tensors.items():
        assert lazy[key].dtype == value.dtype and torch.equal(lazy[key], value)


def test_validation_names_the_field(tmp_path: Path) -> None:
    pair = {"w": torch.ones(2, 2)}
    path = tmp_path / "u.safetensors"
    path.write_bytes(encode_update(pair, UpdateReport(4, 0.25)))
    assert validate_update_file(path, {"w": ((2, 2), "float32")}) == UpdateReport(4, 0.25)
    with pytest.raises(InputError, match=r"tensor 'w': shape \(2, 2\) float32 differs"):
        validate_update_file(path, {"w": ((3, 2), "float32")})
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(InputError, match="truncated"):
        read_header(path)


def test_a_loss_the_federations_training_cannot_give_is_refused(tmp_path: Path) -> None:
    """FedMix gives most of a site's weight by its reported loss; the soft Dice is at most 1, so a report
    above it bought a modified site the round. Dice + BCE has no ceiling."""
    template = {"w": ((2, 2), "float32")}
    path = tmp_path / "u.safetensors"
    path.write_bytes(encode_update({"w": torch.ones(2, 2)}, UpdateReport(4, 1.0, 0.999)))
    assert validate_update_file(path, template, loss="dice").loss == 1.0, "the ceiling itself is a loss"
    for report, field in ((UpdateReport(4, 3.0), "loss"), (UpdateReport(4, 0.2, 1.0001), "loss2")):
        path.write_bytes(encode_update({"w": torch.ones(2, 2)}, report))
        with pytest.raises(InputError, match=rf"^fedmix-report\.{field}: .* is above 1, the most the "
                                             r"federation's 'dice' training loss can be"):
            validate_update_file(path, template, loss="dice")
        assert validate_update_file(path, template, loss="dice+bce") == report
        assert validate_update_file(path, template) == report, "without the loss, only finite and ≥ 0"


def test_aggregating_a_lazy_upload_reads_each_tensor_once(tmp_path: Path, monkeypatch) -> None:
    from fedmix_engine.fedmix.aggregation import StreamingAggregate
    from fedmix_engine.fedmix.weights import AggregationRule

    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    for name in ("one", "two"):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    reads: list[str] = []
    original = LazyUpdate.__getitem__
    monkeypatch.setattr(LazyUpdate, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    acc = StreamingAggregate(AggregationRule())
    acc.add("one", LazyUpdate(tmp_path / "one.safetensors"), 3, 0.5)
    acc.add("two", LazyUpdate(tmp_path / "two.safetensors"), 3, 0.5)
    assert sorted(reads) == ["a", "a", "b", "b"], "shape checks come from the header, not from reading tensors"
    assert torch.allclose(acc.result()["a"], tensors["a"])


def test_a_site_whose_classes_or_channels_differ_from_the_model_is_refused_by_name(tmp_path: Path) -> None:
    from fedmix_engine.data.site_store import SiteStore
    from fedmix_engine.data.synthetic import make_sample
    from fedmix_engine.errors import InputError
    from fedmix_engine.federation.client import check_site_fits_model
    from fedmix_engine.federation.wire import UpdateReport
    from fedmix_engine.fedmix.local_update import LocalReport
    from fedmix_engine.model import ModelConfig

    make_sample(tmp_path / "s", sites=1, images=2, eval_images=1, seed=0, size=32, classes=2)
    with SiteStore.open(tmp_path / "s" / "site-a", readonly=True) as store:
        check_site_fits_model(store, ModelConfig(base_width=4, num_classes=2))
        with pytest.raises(InputError, match=r"site-a: site has 2 class\(es\) \(lesion, cyst\) and 1 channel\(s\); "
                                             r"the federation's model expects 1 and 1$"):
            check_site_fits_model(store, ModelConfig(base_width=4, num_classes=1))
        with pytest.raises(InputError, match=r"site-a: site has 2 class\(es\) \(lesion, cyst\) and 1 channel\(s\); "
                                             r"the federation's model expects 3 \(lesion, cyst, polyp\) and 1$"):
            check_site_fits_model(store, ModelConfig(base_width=4, num_classes=3), ("lesion", "cyst", "polyp"))
    sent = UpdateReport.from_local(LocalReport(5, 0.25, 0.5, {"mask": 5}, {"train": 1.0}))
    assert sent == UpdateReport(5, 0.25, 0.5, {"mask": 5})  # timings stay at the site


def test_an_update_may_move_the_model_by_at_most_ten_times_its_size(tmp_path: Path) -> None:
    """Relative L2 distance from the model the site was sent; a real round of local training moves it by
    about 0.1 (measured: 0.06 at width 8, 0.09 at 16, lr 1e-3, 2 epochs)."""
    from fedmix_engine.federation.wire import MAX_RELATIVE_CHANGE, ChangeSize, tensor_template

    reference = {"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(7)}  # ‖w‖ = 5; integers are not weights
    for moved, accepted in ((0.5, True), (5 * MAX_RELATIVE_CHANGE, True), (5 * MAX_RELATIVE_CHANGE + 0.01, False)):
        update = {"w": reference["w"] + torch.tensor([moved, 0.0]), "steps": torch.tensor(10_000)}
        path = tmp_path / f"{moved}.safetensors"
        path.write_bytes(encode_update(update, UpdateReport(3, 0.2)))
        if accepted:
            assert validate_update_file(path, tensor_template(reference), reference).n == 3
        else:
            with pytest.raises(InputError, match=r"update: moves the model by 10× its own size"):
                validate_update_file(path, tensor_template(reference), reference)
    change = ChangeSize({"w": torch.zeros(2)})  # a model of zeros has no size to move by: nothing to refuse
    change.add("w", torch.ones(2))
    change.check()


def _set(key: str, field: str | None, value):
    def change(header: dict) -> None:
        if field is None or not isinstance(header.get(key), dict):  # an entry an earlier change replaced: whole
            header[key] = value
        else:
            header[key][field] = value
    return change


def _offsets(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Where each tensor's data lies in ``encode_update``'s layout (sorted by name, back to back)."""
    import json

    data = encode_update(tensors, UpdateReport(4, 0.25))
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return {key: header[key]["data_offsets"] for key in tensors}


UPDATE = {"a": torch.ones(3, 4), "b": torch.ones(5), "c": torch.arange(3)}
SPANS = _offsets(UPDATE)  # safetensors puts the 8-byte integers first: c, then a and b


@pytest.mark.parametrize(("change", "said"), [
    (_set("a", None, [1, 2]), r"tensor 'a': not a tensor entry \(an object with dtype, shape and data_offsets\)"),
    (_set("a", "dtype", ["F32"]), r"tensor 'a': dtype \['F32'\] is not a dtype's name"),
    (_set("a", "shape", 12), r"tensor 'a': shape 12 is not a list of sizes"),
    (_set("a", "shape", [3, -4]), r"tensor 'a': shape \[3, -4\] is not a list of sizes"),
    (_set("a", "shape", [3.0, 4]), r"tensor 'a': shape \[3.0, 4\] is not a list of sizes"),
    (_set("a", "data_offsets", [72, 24]), r"tensor 'a': data_offsets \[72, 24\] are not \[begin, end\] with 0 ≤ begin"),
    (_set("a", "data_offsets", [-8, 40]), r"tensor 'a': data_offsets \[-8, 40\] are not \[begin, end\]"),
    (_set("a", "data_offsets", [24, 72, 96]), r"tensor 'a': data_offsets \[24, 72, 96\] are not \[begin, end\]"),
    (_set("a", "data_offsets", None), r"tensor 'a': data_offsets None are not \[begin, end\]"),
    (_set("a", "shape", [3, 5]), r"tensor 'a': data_offsets \[24, 72\] hold 48 bytes; its shape \[3, 5\] of F32 "
                                 r"needs 60"),
    (_set("b", "data_offsets", [64, 84]), r"tensor 'b': its data begins at byte 64, not at 72 where tensor 'a' ends "
                                          r"\(the tensors' data must follow each other without gaps or overlaps\)$"),
    (_set("b", "data_offsets", [76, 96]), r"tensor 'b': its data begins at byte 76, not at 72 where tensor 'a' ends"),
    (_set("c", "data_offsets", [8, 32]), r"tensor 'c': its data begins at byte 8, not at 0 where the data begins"),
    (_set("__metadata__", "fedmix-report", {"n": 4, "loss": 0.25}),
     r"not safetensors: its __metadata__ must map names to strings"),
    (_set("__metadata__", None, ["fedmix-report"]), r"not safetensors: its __metadata__ must map names to strings"),
])
def test_a_malformed_header_is_refused_naming_the_tensor_or_field(tmp_path: Path, change, said: str) -> None:
    """The rules the safetensors library applies on load. Without them a site's malformed header reached the
    server's reading of the update as a TypeError or a torch error (HTTP 500, which the site retries for an
    hour) and offsets pointing before the data were read as weights."""
    assert SPANS == {"c": [0, 24], "a": [24, 72], "b": [72, 92]}
    path = tmp_path / "u.safetensors"
    path.write_bytes(with_header(encode_update(UPDATE, UpdateReport(4, 0.25)), change))
    with pytest.raises(InputError, match=rf"^body: {said}"):
        validate_update_file(path, {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in UPDATE.items()})
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {said}"):
        read_header(path, str(path))


def test_json_nested_thousands_deep_is_refused_as_not_json(tmp_path: Path) -> None:
    """Python's JSON reader raises RecursionError, not ValueError, for arrays nested a few thousand deep:
    a header or a report like that reached the server as an HTTP 500."""
    from safetensors.torch import save

    deep = "[" * 20_000 + "]" * 20_000
    path = tmp_path / "u.safetensors"
    path.write_bytes(save(UPDATE, metadata={"fedmix-report": deep}))
    with pytest.raises(InputError, match=r"^fedmix-report: not valid JSON$"):
        validate_update_file(path, {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in UPDATE.items()})
    header = deep.encode() + b" " * (-len(deep) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(InputError, match=r"^body: not safetensors: the header is not JSON$"):
        read_header(path)


def test_no_damage_to_a_header_gets_past_validation_as_anything_but_a_said_refusal(tmp_path: Path) -> None:
    """Seeded random damage to an update's header (odd values for its fields, whole entries replaced):
    validation either refuses it by name or accepts an update whose every tensor reads back in its shape."""
    import json
    import random

    from fedmix_engine.federation.wire import tensor_template

    reference = {"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.arange(3)}
    good = encode_update(UPDATE, UpdateReport(4, 0.25))
    odd = [None, -1, 0, 10**30, 1.5, "x", [], {}, [1], [-4, 8], [8, 4], [0, 10**20], True, "F32", "I64", [3, 4, 5],
           [[3], 4], [0, 24], [24, 72], [72, 92], [3, 4], [5], json.dumps({"n": 4, "loss": "x"}), '{"n": 4}']
    rng, refused, accepted = random.Random(0), 0, 0
    path = tmp_path / "u.safetensors"
    for _ in range(400):
        changes = []
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(["__metadata__", "a", "b", "c"])
            field = rng.choice({"__metadata__": ["fedmix-report", None]}.get(key, ["dtype", "shape", "data_offsets",
                                                                                    None]))
            changes.append(_set(key, field, rng.choice(odd)))
        path.write_bytes(with_header(good, lambda header, changes=changes: [c(header) for c in changes]))
        try:
            validate_update_file(path, tensor_template(reference), reference, "dice")
        except InputError:
            refused += 1
            continue
        accepted += 1
        lazy = LazyUpdate(path)
        assert {k: tuple(lazy[k].shape) for k in lazy} == {k: tuple(v.shape) for k, v in reference.items()}
    assert refused > 300 and accepted > 0, (refused, accepted)
