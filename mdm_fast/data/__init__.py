"""Training data: datasets (image folders with captions, public tar shards, webdataset, arrays, video
clips), the public reader config, and deterministic resumable sharded loading."""
from mdm_fast.data.datasets import (ArrayDataset, CaptionFolder, SampleDataset, TarIndexDataset,  # noqa: F401
                                    VideoClips, WebDataset, build_dataset, sklearn_digits)
from mdm_fast.data.images import CorruptImage, resize_crop, tile_frames, to_model_range  # noqa: F401
from mdm_fast.data.loader import ShardedSampler, close_loader, collate, make_loader  # noqa: F401
from mdm_fast.data.reader_config import ReaderConfig  # noqa: F401
