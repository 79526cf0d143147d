"""
Per-image work run in the builder's worker processes: decode the image once, cut the positive
and negative crops by slicing, downscale them (:func:`downscale`) and encode them once.

Nothing here writes files or logs; problems travel back in :class:`ImageResult` so the parent
reports them in image order. The decoders' own stderr lines are caught during each decode
(:func:`decode_image`): libjpeg's warnings about damaged data make the image ``corrupt_image``;
anything else is passed on to stderr unchanged.
"""

import os
import tempfile
import threading
from dataclasses import dataclass, field

import cv2
import numpy as np

from .sampling import (
    KEEP,
    classify_boxes,
    count_reasons,
    enlarge_boxes,
    image_rng,
    sample_negatives,
    snap_size,
)
from .bank import group_of

__all__ = [
    "ExtractOptions",
    "ImageTask",
    "ImageResult",
    "ImageReadError",
    "read_image",
    "decode_image",
    "encode_crop",
    "downscale",
    "extract_image",
]

# Fast PNG level: crops are small and the bank is read far more often than written.
_PNG_COMPRESSION = 1


# Defaults of the crop settings; BuildOptions and the CLI read them from here.
DEFAULT_ENLARGE = (1.0, 1.5)  # total enlargement of each side of a positive, U(lo, hi)
DEFAULT_MIN_SIZE = 8  # px, least side of a usable GT box and of a negative
DEFAULT_MAX_SIDE = 256  # px, longer side of a stored crop (0 = keep)
DEFAULT_ENCODING = "jpeg"
DEFAULT_QUALITY = 90  # JPEG quality


@dataclass(frozen=True)
class ExtractOptions:
    """
    Crop settings shared by all images of a build.

    Attributes:
        seed (int): build seed; each image's RNG is seeded from (seed, image_id, pass).
        num_classes (int): C; negatives get label C.
        enlarge (tuple[float, float]): total enlargement range per side for positives.
        min_size (int): minimum side (pixels) of a usable GT box and of a negative.
        max_side (int): longer side of stored crops is downscaled to this (0 = keep).
        encoding (str): "jpeg" or "png".
        quality (int): JPEG quality 1..100.
    """

    seed: int = 0
    num_classes: int = 1
    enlarge: tuple = DEFAULT_ENLARGE
    min_size: int = DEFAULT_MIN_SIZE
    max_side: int = DEFAULT_MAX_SIDE
    encoding: str = DEFAULT_ENCODING
    quality: int = DEFAULT_QUALITY


@dataclass
class ImageTask:
    """
    What a worker needs for one image (a pickled copy travels to the worker).

    Attributes:
        image_id (int), path (str), width (int), height (int): from the json.
        boxes (ndarray): (K, 4) xyxy GT boxes as annotated.
        labels (ndarray): (K,) int32 contiguous labels (-1 unknown category).
        iscrowd (ndarray): (K,) bool.
        num_negatives (int): negatives to place in this pass.
        with_positives (bool): cut the positive crops (only in pass 0).
        pass_index (int): 0 main pass, >= 1 negative make-up passes.
    """

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    num_negatives: int = 0
    with_positives: bool = True
    pass_index: int = 0


@dataclass
class ImageResult:
    """
    Crops of one image, rows in the bank's order (positives in annotation order, then negatives).

    Attributes:
        image_id (int): source image id.
        ok (bool): False when the image could not be decoded (then there are no rows).
        problems (list[tuple[str, str]]): ``(kind, message)`` found while processing.
        crops (list[bytes]): encoded crops.
        label (ndarray): (n,) int32.  group (ndarray): (n,) uint8.  size (ndarray): (n, 2) int32
        (h, w).  box, crop_box (ndarray): (n, 4) float32 xyxy source pixels.
        skipped (dict): skip reason -> count for this image's GT boxes (pass 0 only).
        num_positives (int): positive rows (they come first).
        neg_requested, neg_placed (int): negatives asked for / actually placed.
    """

    image_id: int
    ok: bool = True
    problems: list = field(default_factory=list)
    crops: list = field(default_factory=list)
    label: np.ndarray = None
    group: np.ndarray = None
    size: np.ndarray = None
    box: np.ndarray = None
    crop_box: np.ndarray = None
    skipped: dict = field(default_factory=dict)
    num_positives: int = 0
    neg_requested: int = 0
    neg_placed: int = 0


class ImageReadError(Exception):
    """An image file that cannot be used; ``kind`` is the problem kind for the report."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


# libjpeg's warnings about damaged scan data (jerror.h, JWRN_*). libjpeg prints only the first
# warning of an image; each of these means pixels after the damage are grey or garbage.
_JPEG_DAMAGE = (
    b"Corrupt JPEG data",
    b"Premature end of JPEG file",
    b"Invalid SOS parameters",
    b"Inconsistent progression sequence",
)


class _StderrCapture:
    """
    Collects what native code prints on file descriptor 2 during a call.

    libjpeg (inside ``cv2.imdecode``) reports recoverable damage such as "Corrupt JPEG data: 30
    extraneous bytes before marker 0xd9" only as a line on stderr and still returns an image,
    grey or garbage after the damage; OpenCV offers no flag or error code for it. Pointing fd 2
    at an in-memory file for the decode costs five system calls (a few microseconds, against
    milliseconds for the decode). One file per process (reopened after a fork); a lock keeps
    threads of one process from swapping fd 2 under each other.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._fd, self._pid = None, None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self):
        self._lock = threading.Lock()  # a parent's thread may have held it at the fork

    def _file(self):
        if self._pid != os.getpid():
            if hasattr(os, "memfd_create"):
                self._fd = os.memfd_create("builder-decoder-messages", os.MFD_CLOEXEC)
            else:
                with tempfile.TemporaryFile() as f:
                    self._fd = os.dup(f.fileno())
            self._pid = os.getpid()
        return self._fd

    def call(self, fn, *args):
        """Returns ``(fn(*args), bytes printed on fd 2 meanwhile)``."""
        with self._lock:
            fd = self._file()
            try:
                saved = os.dup(2)
            except OSError:  # no stderr at all: nothing to capture
                return fn(*args), b""
            done = False
            try:
                os.dup2(fd, 2)
                result = fn(*args)
                done = True
            finally:  # also on Ctrl-C: stderr back first, then what was printed passed on
                os.dup2(saved, 2)
                os.close(saved)
                text = self._drain(fd)
                if not done and text:
                    os.write(2, text)
            return result, text

    @staticmethod
    def _drain(fd):
        """Returns what the file holds and empties it for the next call."""
        size = os.fstat(fd).st_size
        if not size:
            return b""
        text = os.pread(fd, size, 0)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        return text


_stderr_capture = _StderrCapture()


def _imdecode(data):
    try:
        return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None


def decode_image(data, path, check=True):
    """
    Decodes image file bytes as uint8 BGR (H, W, 3).

    Args:
        data (bytes): the file's contents.
        path (str): for the messages.
        check (bool): turn the decoder's warnings about damaged JPEG data into an error (the
            builder always does; False only to time the check, as scripts/benchmark.py does).

    Raises:
        ImageReadError: kind ``corrupt_image``.
    """
    fix = "re-download the image or remove it from the json"
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < 0:
        raise ImageReadError("corrupt_image", f"{path}: truncated JPEG (no end marker); {fix}")
    if not check:
        img, text = _imdecode(data), b""
    else:
        img, text = _stderr_capture.call(_imdecode, data)
    lines = text.decode("utf-8", "replace").strip().splitlines()
    said = f"; decoder: {lines[0].strip()!r}" if lines else ""
    if img is None:
        raise ImageReadError(
            "corrupt_image", f"{path}: cannot decode image ({len(data)} bytes{said}); {fix}"
        )
    if any(marker in text for marker in _JPEG_DAMAGE):
        raise ImageReadError(
            "corrupt_image",
            f"{path}: damaged JPEG data, parts of it would decode grey or garbled{said}; {fix}",
        )
    if text:  # not about this image's pixels (a libpng note, another thread's output): pass on
        os.write(2, text)
    return img


def read_image(path):
    """
    Reads and decodes an image once, as uint8 BGR (H, W, 3).

    A JPEG without its end-of-image marker is rejected as truncated, and one whose scan data
    makes libjpeg warn (corrupt data, premature end) as damaged: libjpeg returns those grey or
    garbled after the damage with only a warning on stderr, and their crops would be garbage.

    Raises:
        ImageReadError: kinds ``missing_file``, ``unreadable_file``, ``corrupt_image``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageReadError(
            "missing_file",
            f"{path}: image file not found; check --images or remove the image from the json",
        ) from None
    except OSError as e:
        raise ImageReadError(
            "unreadable_file",
            f"{path}: cannot read image ({e.strerror}); "
            "fix its permissions or remove it from the json",
        ) from None
    return decode_image(data, path)


def encode_crop(crop, encoding="jpeg", quality=90):
    """
    Encodes a uint8 BGR (h, w, 3) crop as standard JPEG/PNG file bytes (any decoder gives the
    right colours: PIL returns RGB, ``cv2.imdecode`` returns BGR).
    """
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        ok, buf = cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, _PNG_COMPRESSION])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for a {crop.shape} crop")
    return buf.reshape(-1).tobytes()


def downscale(crop, width, height):
    """
    Shrinks a (h, w, 3) crop to ``width x height`` (both <= the crop's) with anti-aliasing.

    ``cv2.INTER_AREA`` is ~8x slower at non-integer factors than at integer ones, so the integer
    part of the factor is done with INTER_AREA (box filter, its fast path) and the remaining
    factor (< 2) with INTER_LINEAR, which does not alias below 2x. Mean difference to a single
    INTER_AREA pass is a few grey levels.
    """
    h, w = crop.shape[:2]
    f = min(w // width, h // height)
    if f >= 2:
        crop = cv2.resize(crop, (w // f, h // f), interpolation=cv2.INTER_AREA)
    if crop.shape[:2] != (height, width):
        crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
    return crop


def _cut(img, crop_box, max_side):
    """Slices the integer box ``(x0, y0, x1, y1)`` out of ``img`` and downscales it."""
    x0, y0, x1, y1 = crop_box
    crop = img[y0:y1, x0:x1]
    w, h = snap_size(x1 - x0, y1 - y0, max_side)
    if (w, h) != (x1 - x0, y1 - y0):
        crop = downscale(crop, w, h)
    return crop


def extract_image(task, opts):
    """
    Decodes one image and cuts its positive and negative crops.

    Args:
        task (ImageTask): the image and what to cut from it.
        opts (ExtractOptions): crop settings.

    Returns:
        ImageResult: rows ready for :class:`builder.writer.BankWriter`.
    """
    result = ImageResult(image_id=task.image_id)
    try:
        img = read_image(task.path)
    except ImageReadError as e:
        result.ok = False
        result.problems.append((e.kind, str(e)))
        return result
    height, width = img.shape[:2]
    if (width, height) != (task.width, task.height):
        # Trust the pixels: boxes are clipped to what was decoded.
        result.problems.append(
            (
                "size_mismatch",
                (
                    f"{task.path}: image {task.image_id} decodes to {width}x{height} but the json "
                    f"says {task.width}x{task.height}; fix the json's width/height"
                ),
            )
        )

    # One RNG per (image, pass): draws happen in a fixed order (enlargement, then negatives).
    rng = image_rng(opts.seed, task.image_id, task.pass_index)
    clipped, reasons = classify_boxes(
        task.boxes, task.iscrowd, task.labels, width, height, opts.min_size
    )
    keep = reasons == KEEP
    pos_boxes = clipped[keep]
    pos_crop_boxes = enlarge_boxes(pos_boxes, width, height, opts.enlarge, rng)
    # Negatives must not touch any annotated region, crowd and tiny boxes included.
    neg_boxes = np.zeros((0, 4))
    if task.num_negatives > 0:
        neg_boxes = sample_negatives(
            clipped,
            width,
            height,
            task.num_negatives,
            rng,
            ref_sizes=pos_crop_boxes[:, 2:] - pos_crop_boxes[:, :2],
            min_size=opts.min_size,
        )
    result.neg_requested, result.neg_placed = int(task.num_negatives), len(neg_boxes)

    if task.with_positives:
        result.skipped = count_reasons(reasons)
        labels = task.labels[keep].astype(np.int32)
        boxes, crop_boxes = pos_boxes, pos_crop_boxes
    else:
        labels = np.zeros(0, dtype=np.int32)
        boxes = crop_boxes = np.zeros((0, 4))
    result.num_positives = len(labels)
    labels = np.concatenate([labels, np.full(len(neg_boxes), opts.num_classes, dtype=np.int32)])
    boxes = np.concatenate([boxes, neg_boxes])
    crop_boxes = np.concatenate([crop_boxes, neg_boxes])

    sizes, groups = [], []
    # Plain ints: indexing numpy scalars per crop costs more than the slicing itself.
    for crop_box in crop_boxes.astype(np.int64).tolist():
        crop = _cut(img, crop_box, opts.max_side)
        h, w = crop.shape[:2]
        sizes.append((h, w))
        groups.append(group_of(w, h))
        result.crops.append(encode_crop(crop, opts.encoding, opts.quality))
    result.label = labels
    result.group = np.array(groups, dtype=np.uint8)
    result.size = np.array(sizes, dtype=np.int32).reshape(-1, 2)
    result.box = boxes.astype(np.float32)
    result.crop_box = crop_boxes.astype(np.float32)
    return result
