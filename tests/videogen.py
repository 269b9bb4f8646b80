"""Small test clips made fast with PyAV, and the bad files a video job meets in the wild.

Clips carry their frame number in the picture (``stamp_index`` / ``read_stamp``: a row of
black/white blocks, one bit each, big enough to survive H.264 at any sane quality), so a test can
tell which frame it got from the pixels alone, independently of any timestamp arithmetic.
Written directly with PyAV, not with ``fkp_core.video.VideoWriter``, so the reader's tests do not
depend on the writer under test.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

STAMP_BITS = 12  # frame numbers up to 4095
STAMP_BLOCK = 8  # pixels per bit (side of each square)
VFR_TIME_BASE = Fraction(1, 3000)  # clock of clips written with explicit ``times``


def stamp_index(img: np.ndarray, index: int) -> np.ndarray:
    """Draw ``index`` as a row of STAMP_BITS blocks (white = 1) on the top edge of ``img`` (in place)."""
    for bit in range(STAMP_BITS):
        value = 255 if (index >> bit) & 1 else 0
        img[:STAMP_BLOCK, bit * STAMP_BLOCK:(bit + 1) * STAMP_BLOCK] = value
    return img


def read_stamp(img: np.ndarray) -> int:
    """The frame number drawn by ``stamp_index`` (gray or BGR image), read from the block centres."""
    gray = img if img.ndim == 2 else img.mean(axis=2)
    c = STAMP_BLOCK // 2
    return sum(1 << bit for bit in range(STAMP_BITS) if gray[c, bit * STAMP_BLOCK + c] > 127)


def moving_square_frames(n: int, width: int = 160, height: int = 120, seed: int = 0) -> Iterable[np.ndarray]:
    """``n`` BGR frames: a coloured square moving over a noisy gradient, each stamped with its number."""
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
    base[..., 1] = np.linspace(60, 180, height, dtype=np.uint8)[:, None]
    base[..., 2] = 90
    noise = rng.integers(0, 20, size=base.shape, dtype=np.uint8)
    side = max(8, min(width, height) // 4)
    for i in range(n):
        img = base + noise
        x = int((width - side) * (0.5 + 0.5 * np.sin(i / 7.0)))
        y = STAMP_BLOCK + int((height - side - STAMP_BLOCK) * (0.5 + 0.5 * np.cos(i / 11.0)))
        img[y:y + side, x:x + side] = (30, 60 + (i * 5) % 150, 220)
        yield stamp_index(img, i)


def write_clip(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: int | float | Fraction = 30,
    codec: str = "libx264",
    gop: int = 12,
    bframes: int = 2,
    crf: int = 18,
    options: dict[str, str] | None = None,
    rotation: float | None = None,
    faststart: bool = False,
    times: Sequence[float] | None = None,
) -> Path:
    """Encode BGR frames to ``path`` (container from the suffix); a fixed GOP with ``bframes`` B-frames.

    ``options`` are encoder options; ``rotation`` (counter-clockwise degrees) stores a display
    matrix, as phones do for portrait video; ``faststart`` puts the MP4 index (moov) before the
    frames, as streaming sites do (a truncated copy of such a file still opens). ``times`` gives
    each frame's presentation time in seconds (variable frame rate); default ``i / fps``.
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    opts: dict[str, str] = {}
    if codec == "libx264":
        opts = {"crf": str(crf), "preset": "ultrafast" if bframes == 0 else "veryfast",
                "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": str(bframes)}
    opts.update(options or {})
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else None) as out:
        stream = out.add_stream(codec, rate=rate, options=opts)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec != "libx264":
            stream.codec_context.max_b_frames = bframes
            stream.codec_context.qmax = 4  # near-lossless enough for the stamps to survive
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if times is not None:
            stream.codec_context.time_base = VFR_TIME_BASE
        for i, img in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="bgr24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] / VFR_TIME_BASE), VFR_TIME_BASE
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def moving_square_clip(
    path: str | os.PathLike, n: int = 60, width: int = 160, height: int = 120, **kwargs
) -> Path:
    """A stamped moving-square clip of ``n`` frames (see ``write_clip`` for codec, gop, bframes...)."""
    return write_clip(path, moving_square_frames(n, width, height), **kwargs)


# ---- bad files ----------------------------------------------------------------------------------

def zero_byte_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def random_bytes_file(path: str | os.PathLike, size: int = 64 * 1024, seed: int = 0) -> Path:
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def text_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text("this is not a video\n" * 200)
    return path


def truncated_copy(src: str | os.PathLike, dst: str | os.PathLike, fraction: float = 0.6) -> Path:
    """The first ``fraction`` of ``src``'s bytes (a download or copy cut short)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def mdat_payload(data: bytes) -> tuple[int, int]:
    """(start, end) byte offsets of the payload of the top-level ``mdat`` box of an MP4/MOV file."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            header = 16
        elif size == 0:
            size = len(data) - pos
        if kind == b"mdat":
            return pos + header, pos + size
        if size < header:
            break
        pos += size
    raise ValueError("no mdat box")


def corrupt_mid_file(
    src: str | os.PathLike, dst: str | os.PathLike, block: int = 4096, at: float = 0.5, seed: int = 1
) -> Path:
    """A copy of ``src`` with ``block`` bytes of garbage at fraction ``at`` of the mdat payload.

    The container index stays intact, so the file opens and probes normally; only the coded
    frames in that region are damaged (a bad sector, a flipped block in transfer).
    """
    data = bytearray(Path(src).read_bytes())
    start, end = mdat_payload(bytes(data))
    offset = start + int((end - start - block) * at)
    data[offset:offset + block] = np.random.default_rng(seed).integers(0, 256, block, dtype=np.uint8).tobytes()
    dst = Path(dst)
    dst.write_bytes(bytes(data))
    return dst


def unreadable_file(path: str | os.PathLike, src: str | os.PathLike | None = None) -> Path:
    """A file (a copy of ``src``, or a few bytes) with mode 000."""
    path = Path(path)
    path.write_bytes(Path(src).read_bytes() if src is not None else b"\x00" * 64)
    path.chmod(0)
    return path


def permissions_enforced(path: str | os.PathLike) -> bool:
    """False where mode 000 does not stop reading (running as root, some mounts): skip such tests."""
    try:
        with open(path, "rb"):
            return False
    except PermissionError:
        return True
