"""Image sources: folders (labelled or not), undecodable files, empty folders, the shipped split."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tokctl.errors import UserError
from tokctl.vit import data, fashion_mnist

from .tiny_models import tiny


def _png(path, value=128, size=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _info(labels=None):
    _, info = tiny()
    info.id2label = labels or {}
    return info


def test_labelled_folder_maps_class_names_and_skips_bad_files(tmp_path):
    _png(tmp_path / "Cat" / "a.png")
    _png(tmp_path / "dog" / "b.png", 10)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image")
    info = _info({0: "cat", 1: "dog", 2: "bird"})
    cfg = OmegaConf.create({"kind": "folder", "path": str(tmp_path)})
    src = data.open_source(cfg, info)
    assert src.has_labels and sorted(src.labels) == [0, 1, 1]
    batches = list(src.batches(8, list(range(len(src)))))
    assert sum(len(b.names) for b in batches) == 2
    assert batches[0].images.shape[1:] == (3, 32, 32) and batches[0].images.dtype == torch.uint8
    assert list(src.skipped) == ["dog/broken.jpg"]


def test_folder_without_matching_labels_is_unlabelled(tmp_path):
    _png(tmp_path / "x" / "a.png")
    _png(tmp_path / "y" / "b.png")
    src = data.open_source(OmegaConf.create({"kind": "folder", "path": str(tmp_path)}), _info({0: "cat"}))
    assert not src.has_labels and src.notes


def test_flat_folder_is_unlabelled(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.png")
    src = data.open_source(OmegaConf.create({"kind": "folder", "path": str(tmp_path)}), _info({0: "sub"}))
    assert len(src) == 2 and not src.has_labels


def test_folders_are_read_through_imagefolder_into_the_isolated_cache(tmp_path):
    import os

    _png(tmp_path / "imgs" / "a.png")
    data.open_source(OmegaConf.create({"kind": "folder", "path": str(tmp_path / "imgs")}), _info())
    cache = os.environ["TOKCTL_CACHE_DIR"]  # set by the tests' conftest: never ~/.cache
    assert any(p.name == "imagefolder" for p in (Path(cache) / "datasets").iterdir())


def test_empty_or_missing_folders_are_one_line_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no images"):
        data.check_early(OmegaConf.create({"kind": "folder", "path": str(tmp_path)}))
    with pytest.raises(UserError, match="does not exist"):
        data.check_early(OmegaConf.create({"kind": "folder", "path": str(tmp_path / "nope")}))


def test_shipped_fashion_mnist_test_split():
    images, labels = fashion_mnist.load("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert sorted(torch.bincount(labels).tolist()) == [1000] * 10


def test_fit_converts_channels_and_size():
    info = _info()
    info.num_channels, info.image_size = 1, 28
    out = data._fit(torch.full((3, 40, 60), 200, dtype=torch.uint8), info)
    assert out.shape == (1, 28, 28) and int(out.float().mean()) == 200


def test_saved_datasets_library_dataset(tmp_path):
    import datasets  # a core dependency: this test always runs
    images = [Image.fromarray(np.full((12, 12), v, np.uint8)) for v in (0, 100, 200)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["Cat", "dog"])})
    ds = datasets.Dataset.from_dict({"img": images, "label": [0, 1, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    info = _info({0: "cat", 1: "dog"})
    src = data.open_source(OmegaConf.create({"kind": "hf_disk", "path": str(tmp_path / "ds")}), info)
    assert src.has_labels and src.labels == [0, 1, 1]
    batch = next(src.batches(4, [0, 1, 2]))
    assert batch.images.shape == (3, 3, 32, 32) and int(batch.images[2].float().mean()) == 200
