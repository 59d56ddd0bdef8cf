"""The public reader config (apple/ml-mdm ``reader.ReaderConfig``): same field names and defaults."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReaderConfig:
    smaller_side_size: int = -1  # not used (nor by the public reader): the smaller side is resized to image_size
    max_caption_length: int = -1  # longer captions (UTF-8 bytes + 2): samples dropped; prompts cut (-1: no limit)
    max_token_length: int = -1  # captions of more tokens: dropped in training, cut otherwise (-1: no limit)
    image_size: int = -1  # the top resolution: images are resized and cropped to it
    random_crop: bool = False  # random instead of centre crop
    num_kept_files: int = -1
    num_readers: int = 16  # loader worker processes (capped by the CPU count)
    shuffle_buffer_size: int = 9600
    reader_buffer_size: int = 9600  # batches prefetched in all (spread over the workers)
    endpoint_url: str = ""
    bucket: str = "mlx"
    prepad_caption_with_space: bool = True
    use_tokenizer_scores: bool = True
    prepad_bos: bool = False
    append_eos: bool = True
    padding_token: str = "<pad>"
    pad_to_max_length: bool = False  # captions padded to max_token_length, not to the longest of the batch
