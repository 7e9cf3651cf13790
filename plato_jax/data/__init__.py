"""Dataset readers: image–caption records with stable integer row ids.

Every reader yields `Record(row_id, image, caption)` in a fixed order (image: encoded
bytes of an image, or of a video for a video model, or None; caption: str or None) and can
start at a position (a resumed extraction):

    ImageFolder(root, captions="captions.jsonl")   # jsonl or csv: image path, caption, id
    Parquet(path_or_dir)                           # WIT / HF-datasets layout
    WebDataset(tar_or_dir)                         # webdataset tar shards

Row ids come from an integer `id` field/column when there is one, else the record's
position in the reader's order (files sorted by name). They never depend on which records
a run skips.
"""
from plato_jax.data.readers import (ImageFolder, Parquet, Record, WebDataset, decode_image,
                                    decode_video, open_dataset, video_frame_indices)

__all__ = ["ImageFolder", "Parquet", "Record", "WebDataset", "decode_image", "decode_video",
           "open_dataset", "video_frame_indices"]
