"""Each selection rule of design §4, on hand-built predictions."""

from __future__ import annotations

import torch

from fedmix_engine.data.tensors import KIND_BOX, KIND_MASK, KIND_TAG, TAG_ABSENT, TAG_PRESENT, TAG_UNKNOWN, SiteTensors
from fedmix_engine.fedmix.pseudo_labels import PseudoLabels, agreement_dice, select_pseudo_labels

S = 16


def _data(kinds: list[int], k: int = 1) -> SiteTensors:
    n = len(kinds)
    return SiteTensors([f"i{j}" for j in range(n)], torch.tensor(kinds, dtype=torch.int8), torch.zeros(n, 1, S, S),
                       torch.zeros(n, k, S, S, dtype=torch.bool), torch.zeros(n, k, S, S, dtype=torch.bool),
                       torch.full((n, k), TAG_UNKNOWN, dtype=torch.int8), tuple(f"c{c}" for c in range(k)))


def _square(y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    m = torch.zeros(S, S, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_agreement_dice_treats_two_empty_masks_as_agreeing() -> None:
    empty = torch.zeros(1, 1, S, S, dtype=torch.bool)
    full = torch.ones(1, 1, S, S, dtype=torch.bool)
    assert agreement_dice(empty, empty).item() == 1.0
    assert agreement_dice(empty, full).item() == 0.0


def test_box_pseudo_label_is_cut_to_the_box_and_needs_agreement_and_fill() -> None:
    data = _data([KIND_BOX] * 3)
    data.boxes[:, 0] = _square(4, 4, 12, 12)  # 64 px box
    pred = torch.zeros(3, 1, S, S, dtype=torch.bool)
    pred[:, 0] = _square(0, 0, 16, 16)  # predicts everything: refined to the box, fills it → kept
    pred[1, 0] = _square(5, 5, 7, 7)  # 4 px inside a 64 px box: Dice(P¹, B) = 8/68 < 0.5 → rejected
    pred2 = pred.clone()
    pred2[2, 0] = _square(4, 4, 6, 12)  # net 2 disagrees on sample 2 → rejected
    labels = select_pseudo_labels(pred, pred2, data, tau=0.9, min_box_fill=0.5)
    assert labels.keep.tolist() == [True, False, False]
    assert labels.target2[0, 0].equal(_square(4, 4, 12, 12)), "prediction outside the box is cut away"
    assert labels.counts["box_rejected_fill"] == 1 and labels.counts["box_rejected_agreement"] == 1


def test_empty_prediction_for_a_class_tagged_present_is_rejected() -> None:
    data = _data([KIND_TAG, KIND_TAG])
    data.tags[:, 0] = TAG_PRESENT
    empty = torch.zeros(2, 1, S, S, dtype=torch.bool)
    pred = empty.clone()
    pred[1, 0] = _square(2, 2, 8, 8)
    labels = select_pseudo_labels(pred, pred.clone(), data)
    # both networks agree perfectly on sample 0 (both empty), but a present lesion cannot be empty
    assert labels.keep.tolist() == [False, True]
    assert labels.counts["tag_rejected_empty_present"] == 1


def test_absent_class_is_forced_to_background_and_is_a_certain_target() -> None:
    data = _data([KIND_TAG], k=2)
    data.tags[0] = torch.tensor([TAG_ABSENT, TAG_PRESENT], dtype=torch.int8)
    pred = torch.zeros(1, 2, S, S, dtype=torch.bool)
    pred[0, 0] = _square(0, 0, 8, 8)  # predicts the absent class: zeroed
    pred[0, 1] = _square(8, 8, 14, 14)
    labels = select_pseudo_labels(pred, pred.clone(), data)
    assert labels.keep.item()
    assert not labels.target1[0, 0].any() and not labels.target2[0, 0].any()
    assert labels.target1[0, 1].equal(_square(8, 8, 14, 14))
    only_absent = _data([KIND_TAG])
    only_absent.tags[0, 0] = TAG_ABSENT
    noisy = torch.ones(1, 1, S, S, dtype=torch.bool)
    labels = select_pseudo_labels(noisy, torch.zeros_like(noisy), only_absent)
    assert labels.keep.item() and not labels.target1.any(), "all-absent images are kept as all-background"


def test_mask_samples_train_on_their_mask_and_cross_supervision_swaps_targets() -> None:
    data = _data([KIND_MASK, KIND_TAG])
    data.masks[0, 0] = _square(1, 1, 5, 5)
    data.tags[1, 0] = TAG_PRESENT
    p1 = torch.zeros(2, 1, S, S, dtype=torch.bool)
    p2 = p1.clone()
    p1[1, 0] = _square(2, 2, 10, 10)
    p2[1, 0] = _square(2, 2, 10, 11)  # agreement 0.94 ≥ 0.9
    labels = select_pseudo_labels(p1, p2, data)
    assert labels.keep.tolist() == [True, True]
    assert labels.target1[0].equal(data.masks[0]) and labels.target2[0].equal(data.masks[0])
    assert labels.target1[1, 0].equal(p2[1, 0]), "network 1 learns from network 2's pseudo-label"
    assert labels.target2[1, 0].equal(p1[1, 0]), "network 2 learns from network 1's pseudo-label"


def test_only_images_whose_target_depends_on_the_networks_are_predicted() -> None:
    from torch import nn

    from fedmix_engine.device import plan_device
    from fedmix_engine.fedmix.pseudo_labels import needs_prediction, predict_binary, predict_where_needed

    class CountingNet(nn.Module):
        """Predicts something different on every image and counts what it was shown."""

        def __init__(self, shift: float) -> None:
            super().__init__()
            self.shift, self.seen = shift, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen += len(x)
            return x - self.shift

    # mask, box, tag present, tag absent, tag unknown, box
    data = _data([KIND_MASK, KIND_BOX, KIND_TAG, KIND_TAG, KIND_TAG, KIND_BOX])
    data.images.copy_(torch.rand(data.images.shape, generator=torch.Generator().manual_seed(0)))
    data.masks[0, 0] = _square(1, 1, 6, 6)
    data.boxes[1, 0] = _square(2, 2, 12, 12)
    data.boxes[5, 0] = _square(0, 0, 16, 16)
    data.tags[2, 0], data.tags[3, 0] = TAG_PRESENT, TAG_ABSENT
    plan = plan_device("cpu")
    nets = CountingNet(0.3), CountingNet(0.35)
    every = [predict_binary(net, data.images, plan, 2) for net in nets]
    needed = [predict_where_needed(net, data, needs_prediction(data), plan, 2) for net in nets]
    assert [net.seen for net in nets] == [6 + 4, 6 + 4], "mask and all-absent images are not predicted"
    full, lean = select_pseudo_labels(*every, data), select_pseudo_labels(*needed, data)
    assert lean.keep.equal(full.keep) and lean.target1.equal(full.target1) and lean.target2.equal(full.target2)
    assert lean.counts == full.counts


def test_audit_compares_selected_and_rejected_pseudo_labels_with_the_hidden_truth() -> None:
    from fedmix_engine.fedmix.pseudo_label_audit import audit_pseudo_labels

    data = _data([KIND_MASK, KIND_BOX, KIND_BOX, KIND_TAG, KIND_TAG])
    data.boxes[1:3, 0] = _square(0, 0, 16, 16)
    data.tags[3, 0] = TAG_PRESENT
    data.tags[4, 0] = TAG_ABSENT  # certain: not predicted, so not audited
    truth = torch.zeros(5, 1, S, S, dtype=torch.bool)
    truth[1:4, 0] = _square(0, 0, 4, 8)  # 32 px
    p1 = torch.zeros_like(truth)
    p1[1, 0] = _square(0, 0, 4, 8)  # box, selected: exact → Dice 1
    p1[2, 0] = _square(0, 0, 4, 4)  # box, rejected: half of it → Dice 2·16/48
    p1[3, 0] = _square(0, 0, 8, 8)  # tag, selected: twice the truth → Dice 2·32/96, size 2
    labels = PseudoLabels(torch.zeros_like(p1), p1, torch.tensor([True, True, False, True, True]))
    known = torch.ones(5, dtype=torch.bool)

    audit = audit_pseudo_labels(labels, data, truth, known)
    assert audit == {
        "box": {"selected": 1, "rejected": 1, "dice": 1.0, "rejected_dice": round(32 / 48, 4), "size_ratio": 1.0},
        "tag": {"selected": 1, "rejected": 0, "dice": round(64 / 96, 4), "rejected_dice": None, "size_ratio": 2.0},
    }
    known[3] = False  # an image the oracle does not hold is left out
    assert "tag" not in audit_pseudo_labels(labels, data, truth, known)


def test_kept_summary_names_only_the_kinds_a_site_has() -> None:
    from fedmix_engine.fedmix.pseudo_labels import kept_summary

    data = _data([KIND_MASK, KIND_BOX, KIND_BOX, KIND_TAG])
    data.boxes[1:3, 0] = _square(4, 4, 12, 12)
    pred = torch.zeros(4, 1, S, S, dtype=torch.bool)
    pred[1, 0] = _square(5, 5, 11, 11)  # agrees with itself and fills its box: kept; image 2 is empty: not
    counts = select_pseudo_labels(pred, pred, data).counts
    assert kept_summary(counts) == "; pseudo-labels kept: 1 of 2 box, 1 of 1 tag"
    assert kept_summary({"mask": 3, "certain_negatives": 0}) == ""  # masks only, or a warm-up round
