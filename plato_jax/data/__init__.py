"""Dataset readers: media–caption records with stable integer row ids, and the decoders of
their media.

Every reader yields `Record(row_id, media, caption)` in a fixed order (media: the encoded
bytes of an image, a video or an audio clip, or None; caption: str or None) and can start
at a position (a resumed extraction):

    ImageFolder(root, captions="captions.jsonl")   # jsonl or csv: media path, caption, id
    Parquet(path_or_dir)                           # WIT / HF-datasets layout
    WebDataset(tar_or_dir)                         # webdataset tar shards

Row ids come from an integer `id` field/column when there is one, else the record's
position in the reader's order (files sorted by name). They never depend on which records
a run skips.
"""
from plato_jax.data.media import (decode_audio, decode_image, decode_video, resample,
                                  video_frame_indices)
from plato_jax.data.readers import ImageFolder, Parquet, Record, WebDataset, open_dataset

__all__ = ["ImageFolder", "Parquet", "Record", "WebDataset", "decode_audio", "decode_image",
           "decode_video", "open_dataset", "resample", "video_frame_indices"]
