"""The wire format: updates read back exactly, one tensor at a time; malformed bodies refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

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
