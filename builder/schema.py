"""
The HDF5 sample-bank format (version 1), shared by the writer (``builder``) and the reader
(``montage_pretrain.bank``).

File layout (N samples, C foreground categories)::

    /crops        (N,)   vlen uint8   encoded crop (JPEG or PNG bytes, RGB)
    /label        (N,)   int32        0..C-1 = category (contiguous), C = background (negative)
    /group        (N,)   uint8        0 = S (0.5 <= w/h <= 1.5), 1 = T (w/h < 0.5), 2 = W (w/h > 1.5)
    /size         (N, 2) int32        stored crop (height, width) in pixels, after any resize
    /image_id     (N,)   int64        source image id (the json's "id")
    /box          (N, 4) float32      original GT box, x0 y0 x1 y1 in source pixels (negatives:
                                      the sampled background box)
    /crop_box     (N, 4) float32      enlarged box actually cut, x0 y0 x1 y1 in source pixels
    /index/S, /index/T, /index/W      int64 sample indices of each group (ascending)

Root attributes::

    format = "montage-sample-bank", version = 1
    num_classes      C (int)
    category_names   json list of C names, in contiguous-label order
    category_ids     json list of C dataset category ids, in contiguous-label order
    encoding         "jpeg" or "png"
    seed, tool_version, build_args (json), counts (json), created (ISO time)

Conventions of the writer (``python -m builder build``, version 1.0), for readers:

- ``/crops`` holds ordinary JPEG/PNG files of the true colours: PIL decodes them to RGB,
  ``cv2.imdecode`` to BGR (convert with ``cv2.COLOR_BGR2RGB``).
- Rows are in image order (json order): per image its positives in annotation order, then its
  negatives; negatives from the make-up passes (see ``builder/build.py``) follow at the end.
- Positives: ``/box`` is the GT box clipped to the image; ``/crop_box`` is the randomly enlarged
  box, whole pixels, clipped to the image, always containing ``/box``. Negatives: ``/box`` equals
  ``/crop_box`` and has zero intersection with every GT box of its image (crowd and tiny included).
- ``/size`` and ``/group`` describe the stored crop after the optional ``--max-side`` downscale,
  so ``group == group_of(size[1], size[0])`` always holds.
- ``counts`` (json): ``images`` {in_json, selected, without_annotations, missing, failed, decoded,
  with_samples}, ``annotations`` {total, planned_positives, skipped {crowd, degenerate, outside,
  tiny, unknown_category}, in_missing_or_failed_images}, ``samples`` {total, positives,
  negatives, positives_by_group, negatives_by_group}, ``negatives`` {ratio, target,
  placed_by_pass, shortfall, images_exhausted, exhausted_image_ids (first 20)}, ``problems``
  {kind: count}.
- The ``format`` attribute is written last, and the file appears under its name only when
  complete (``os.replace`` of ``NAME.tmp-<pid>``).
"""

FORMAT_NAME = "montage-sample-bank"
FORMAT_VERSION = 1
GROUPS = ("S", "T", "W")
GROUP_S, GROUP_T, GROUP_W = 0, 1, 2
S_MIN_ASPECT, S_MAX_ASPECT = 0.5, 1.5


def group_of(width, height):
    """
    Returns the group id of a crop from its size (pixels): S for 0.5 <= w/h <= 1.5 (both ends
    inclusive, as the paper's "between 0.5 and 1.5"), T for w/h < 0.5, W for w/h > 1.5.
    """
    aspect = float(width) / float(height)
    if aspect < S_MIN_ASPECT:
        return GROUP_T
    if aspect > S_MAX_ASPECT:
        return GROUP_W
    return GROUP_S


class BankFormatError(ValueError):
    """Raised when a file is not a sample bank this code can read."""


def check_bank(h5, path="<bank>"):
    """
    Validates an open ``h5py.File`` as a sample bank; raises :class:`BankFormatError` with a
    one-line message naming the file and the fix.
    """
    fmt = h5.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT_NAME:
        raise BankFormatError(
            f"{path}: not a Montage sample bank (format attribute {fmt!r}); "
            f"build one with `python -m builder build --annotations JSON --images DIR --out {path}`"
        )
    version = int(h5.attrs.get("version", -1))
    if version != FORMAT_VERSION:
        raise BankFormatError(
            f"{path}: sample bank version {version}, this code reads version {FORMAT_VERSION}; "
            "rebuild it with `python -m builder build ... --overwrite`"
        )
    missing = [k for k in ("crops", "label", "group", "size", "index/S", "index/T", "index/W")
               if k not in h5]
    if missing:
        raise BankFormatError(
            f"{path}: sample bank is incomplete (missing {', '.join(missing)}); "
            "rebuild it with `python -m builder build ... --overwrite`"
        )
