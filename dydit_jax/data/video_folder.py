"""A folder of video files (``.mp4 .avi .gif .webm .mkv .mov``), decoded with PyAV.

Layout of ``data_dir``: class subfolders (``data_dir/<class>/**/<video>``; classes are the
subfolder names in sorted order, labels 0..K-1, as an ImageFolder), or the videos directly in
``data_dir`` (unconditional: one class, every label 0). Files are listed once, sorted by path,
so example ``i`` is the same file on every host and after every restart.

Decoding (``pip install av``; its wheels bundle FFmpeg): the first video stream, decoded from
the start up to the clip's last frame (cheap for clips of a few seconds, UCF-101's kind; long
videos cost their decoding up to the clip). The frame count comes from the container; when it
gives none (GIF, some WebM) or more frames than decode, the clip is chosen on the frames
actually decoded, so it stays a pure function of the file and the keys. Clip sampling and
preprocessing: :mod:`dydit_jax.data.clips` (RGB, 16 frames at stride 3 by default).

Config keys: ``data_dir`` (required) and the clip keys of :mod:`~dydit_jax.data.clips`.
"""
from __future__ import annotations

import os

from dydit_jax.data import base, clips

EXTENSIONS = (".mp4", ".avi", ".gif", ".webm", ".mkv", ".mov")


def _videos_under(folder: str) -> list[str]:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if f.lower().endswith(EXTENSIONS))


def list_videos(data_dir: str) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of a video folder (see the module docstring)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"config.data.data_dir={data_dir!r} is not a directory of "
                                "videos")
    entries = sorted(os.listdir(data_dir))
    top = [os.path.join(data_dir, f) for f in entries
           if f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(data_dir, f))]
    classes = [d for d in entries if os.path.isdir(os.path.join(data_dir, d))]
    if top:
        if any(_videos_under(os.path.join(data_dir, d)) for d in classes):
            raise ValueError(f"{data_dir} holds videos both directly and in subfolders: put "
                             "every video in a class subfolder, or all of them directly in "
                             "the folder (unconditional)")
        return top, [0] * len(top), []
    paths, labels, names = [], [], []
    for d in classes:
        videos = _videos_under(os.path.join(data_dir, d))
        if videos:
            paths += videos
            labels += [len(names)] * len(videos)
            names.append(d)
    if not paths:
        raise FileNotFoundError(f"no video files ({' '.join(EXTENSIONS)}) in {data_dir} or "
                                "its subfolders (config.data.data_dir)")
    return paths, labels, names


def decode_clip(path: str, choose: clips.ChooseFrames) -> list:
    """The PIL RGB frames at ``choose(T)`` of the first video stream of ``path``."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            stream = container.streams.video[0]
            want = choose(stream.frames) if stream.frames > 0 else None
            frames = []
            for frame in container.decode(stream):
                frames.append(frame)
                if want is not None and len(frames) > want.max():
                    break
            if not frames:
                raise ValueError("it has no decodable frames")
            if want is None or len(frames) <= want.max():   # count unknown or too high
                want = choose(len(frames))
            return [frames[i].to_image().convert("RGB") for i in want]
    except Exception as e:  # noqa: BLE001 - any decoding failure names the file
        raise ValueError(f"video_folder: cannot decode {path}: {e}") from e


class VideoFolderSource(clips.ClipSource):
    name = "video_folder"

    def __init__(self, cfg, *, process_index: int, process_count: int, local_batch_size: int):
        try:
            import av  # noqa: F401
        except ImportError:
            raise ImportError("data.name=video_folder decodes with PyAV: pip install av") \
                from None
        self.data_dir = os.path.expanduser(str(base.cfg_require(cfg, "data_dir", self.name)))
        self.paths, self.labels, self.class_names = list_videos(self.data_dir)
        self.num_classes = max(1, len(self.class_names))
        self._init_clips(cfg, len(self.paths), process_index=process_index,
                         process_count=process_count, local_batch_size=local_batch_size)

    def _read_clip(self, index, choose):
        return decode_clip(self.paths[index], choose), self.labels[index]
