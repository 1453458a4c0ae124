"""img2dataset's resize at download time is an option with other pixels than the exact default:
a store filled with one download resizing refuses to be resumed or appended to with another."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from activation_store.errors import StoreMismatchError
from activation_store.harvest.config import HarvestConfig
from activation_store.harvest.run import _check_compatible


def _store_made_with(**download):
    model = SimpleNamespace(preset="open_clip", fingerprint="f" * 64, n_tokens=257, width=64, model_name="m",
                            cfg=SimpleNamespace(pretrained="none"))
    harvest_config = HarvestConfig(out="s", urls="list.parquet", layers=[1]).to_dict()
    harvest_config["download"].update(download)
    store = SimpleNamespace(url="s", locations=["resid_1"], n_tokens=257, d_model=64,
                            attrs={"model": {"preprocess": "open_clip", "fingerprint": "f" * 64},
                                   "harvest_config": harvest_config})
    return store, model


def _cfg(**download) -> HarvestConfig:
    cfg = HarvestConfig(out="s", urls="list.parquet", layers=[1])
    for k, v in download.items():
        setattr(cfg.download, k, v)
    return cfg


def test_the_same_download_resizing_resumes():
    store, model = _store_made_with(resize_mode="keep_ratio", image_size=224)
    _check_compatible(store, _cfg(resize_mode="keep_ratio", image_size=224), model)
    store, model = _store_made_with(resize_mode="no", image_size=256)
    _check_compatible(store, _cfg(resize_mode="no", image_size=999), model)  # no resizing: the size is unused


@pytest.mark.parametrize("change", [{"resize_mode": "no"}, {"image_size": 256}])
def test_other_download_resizing_is_refused_naming_the_flags(change):
    store, model = _store_made_with(resize_mode="keep_ratio", image_size=224)
    with pytest.raises(StoreMismatchError, match=r"download resizing.*--download-resize-mode and --download-image-size"):
        _check_compatible(store, _cfg(**{"resize_mode": "keep_ratio", "image_size": 224, **change}), model)
