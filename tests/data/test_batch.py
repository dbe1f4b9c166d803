"""The loader's typed hand-off: what a Batch must hold, and what collate makes of decoded samples."""

import pytest
import torch

from data.batch import Batch, collate


def _item(key: str, **extra) -> dict:
    return {
        "key": key,
        "text": f"caption {key}",
        "fps": 8.0,
        "latent": torch.full((4, 2, 3, 3), float(len(key))),
    } | extra


def test_collate_stacks_what_every_sample_has_and_keeps_labels_only_when_all_have_one():
    batch = collate([_item("a", label=3), _item("bb", label=5)], "8x24x24")
    assert len(batch) == 2 and batch.key == ["a", "bb"] and batch.bucket == "8x24x24"
    assert batch.latent.shape == (2, 4, 2, 3, 3) and batch.latent[1].unique().tolist() == [2.0]
    assert batch.label.tolist() == [3, 5] and batch.label.dtype == torch.long
    assert batch.video is None and batch.text_emb is None and batch.text_mask is None
    assert sorted(batch.tensors()) == ["fps", "label", "latent"]
    assert collate([_item("a", label=3), _item("b")], "8x24x24").label is None


def test_a_batch_holds_exactly_one_of_video_and_latent():
    fps = torch.full((1,), 8.0)
    with pytest.raises(ValueError, match="batch of bucket 1x8x8: exactly one of video and latent"):
        Batch("1x8x8", ["k"], [""], fps)
    with pytest.raises(ValueError, match="exactly one of video and latent"):
        Batch("1x8x8", ["k"], [""], fps, video=torch.zeros(1, 3, 1, 8, 8), latent=torch.zeros(1, 4, 1, 1, 1))
