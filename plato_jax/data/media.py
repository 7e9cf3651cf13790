"""Decoding the media of records: images (PIL), videos (PyAV) and audio (soundfile). Each
decoder returns None for missing or undecodable bytes, so that extraction fails or skips
the record by its policy, naming the row."""
from __future__ import annotations

import collections
import io
import math

import numpy as np


def decode_image(data: bytes, mode: str | None = "RGB"):
  """A PIL image in `mode` (None: as stored), or None when the bytes are missing, not a
  readable image, or a decompression bomb (more pixels than PIL's `Image.MAX_IMAGE_PIXELS`)."""
  import warnings

  from PIL import Image, UnidentifiedImageError
  if not data:
    return None
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)  # bombs are bad records
      image = Image.open(io.BytesIO(data))
      image.load()
      return image if mode is None else image.convert(mode)
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
          Image.DecompressionBombWarning):
    return None


def video_frame_indices(total: int, num_frames: int) -> np.ndarray:
  """Frames sampled uniformly over a video, as transformers' video processors do by default:
  i · total // num_frames for i < num_frames."""
  return np.arange(num_frames, dtype=np.int64) * total // num_frames


def decode_video(data: bytes, num_frames: int):
  """`num_frames` RGB PIL frames of a video (bytes of any container FFmpeg reads, decoded by
  PyAV), sampled by `video_frame_indices`; None when the bytes are missing, not a decodable
  video, or it has fewer frames than asked for. Only the sampled frames are kept."""
  import av
  if not data:
    return None
  try:
    with av.open(io.BytesIO(data)) as container:
      # The first video stream that is not attached cover art (FFmpeg's attached_pic).
      stream = next((v for v in container.streams.video
                     if not int(getattr(v, "disposition", 0)) & 0x400), None)
      if stream is None:
        return None
      total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
      if total < num_frames:
        return None
      if not stream.frames:  # counted by demuxing: decode from the start again
        container.seek(0)
      wanted = collections.Counter(video_frame_indices(total, num_frames).tolist())
      frames = []
      for i, frame in enumerate(container.decode(stream)):
        if wanted[i]:
          frames.extend([frame.to_image().convert("RGB")] * wanted[i])
        if len(frames) == num_frames:
          return frames
  except (av.error.FFmpegError, ValueError, OSError, IndexError):
    return None
  return None  # fewer decodable frames than the container declared


def decode_audio(data: bytes, sample_rate: int, max_seconds: float | None = None):
  """(waveform, duration): a mono float32 waveform at `sample_rate` Hz (channels averaged,
  as Dasheng's data pipeline does; other rates resampled by `resample`), at most its first
  `max_seconds`, and the whole clip's duration in seconds; None when the bytes are missing,
  not audio that libsndfile reads (WAV, FLAC, Ogg Vorbis/Opus, MP3, ...), or hold no
  samples. Only what the cut keeps is read (plus a margin that leaves the resampled samples
  as they are in the whole clip)."""
  import soundfile
  if not data:
    return None
  try:
    with soundfile.SoundFile(io.BytesIO(data)) as f:
      rate, total = f.samplerate, f.frames
      wanted = total if max_seconds is None else min(total, math.ceil(max_seconds * rate) + rate)
      wave = f.read(wanted, dtype="float32", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError):
    return None
  if wave.size == 0 or rate <= 0:
    return None
  wave = wave.mean(axis=1, dtype=np.float64) if wave.shape[1] > 1 else wave[:, 0]
  try:
    wave = resample(wave, rate, sample_rate)
  except ValueError:  # an odd rate whose kernel would not fit: a bad record, not a crash
    return None
  if max_seconds is not None:
    wave = wave[:math.ceil(max_seconds * sample_rate)]
  return wave.astype(np.float32), total / rate


MAX_RESAMPLE_KERNEL = 1 << 24  # elements of the polyphase kernel (f64: 128 MB)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int, *, lowpass_filter_width: int = 6,
             rolloff: float = 0.99, block: int = 8192) -> np.ndarray:
  """Band-limited resampling of a 1-D waveform by a Hann-windowed sinc (torchaudio's
  `functional.resample` defaults), computed in float64, `block` output frames at a time:
  an output of ⌈len · new/orig⌉ samples."""
  if orig_rate == new_rate:
    return np.asarray(wave)
  g = math.gcd(int(orig_rate), int(new_rate))
  orig, new = int(orig_rate) // g, int(new_rate) // g
  if new * orig > MAX_RESAMPLE_KERNEL:  # (44,099 → 16,000 Hz would need a 5.6 GB kernel)
    raise ValueError(f"resampling {orig_rate} → {new_rate} Hz needs a {new} × {orig}+ "
                     f"kernel; convert the file to a common rate first")
  cutoff = min(orig, new) * rolloff
  width = math.ceil(lowpass_filter_width * orig / cutoff)
  # kernel[p, j]: the weight of input sample (frame start − width + j) for output phase p.
  t = (np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
       - np.arange(new, dtype=np.float64)[:, None] / new) * cutoff
  t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
  window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
  t = t * math.pi
  safe = np.where(t == 0, 1.0, t)
  kernel = np.where(t == 0, 1.0, np.sin(safe) / safe) * window * (cutoff / orig)
  padded = np.pad(np.asarray(wave, np.float64), (width, width + orig))
  frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]
  out = np.concatenate([(frames[i:i + block] @ kernel.T).reshape(-1)
                        for i in range(0, len(frames), block)])
  return out[:math.ceil(new * len(wave) / orig)]
