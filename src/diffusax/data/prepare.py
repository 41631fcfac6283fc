"""Builds a folder of the user's images into a local TFDS array_record dataset.

    python -m diffusax.data.prepare --images=DIR --name=NAME --size=64 --data_dir=DATA_DIR \\
        [--on_error=refuse|skip] [--test_fraction=0.1] [--encoding=png|jpeg] [--seed=0] \\
        [--overwrite] [--workers=N]
    python -m diffusax.main --config=configs/... --workdir=... \\
        --config.data.name=NAME --config.data.data_dir=DATA_DIR

Layout (torchvision's ImageFolder rule): the sub-folders of DIR are the classes,
sorted by name -> labels 0..K-1, with their images found recursively; a DIR with
no sub-folders holds unlabelled images. Names starting with '.' are ignored.
Every other file must be a JPEG, PNG or WebP image (by content, not extension);
one that is not, cannot be decoded, or lies directly in a DIR that has class
folders is *bad*: `--on_error=refuse` (default) names them all and writes
nothing, `--on_error=skip` leaves them out and lists them.

Each image: EXIF orientation applied, converted to RGB (alpha dropped), resized
with PIL's antialiased bicubic filter so its short side is `size`
(w x h -> round(w*size/h) x size for w >= h, small images are upscaled) and
centre-cropped to size x size (offsets floor((W-size)/2), floor((H-size)/2)),
then stored as PNG (lossless) or JPEG (quality 95).

Split: file f (path relative to DIR, '/'-separated) is in `test` iff
u(f) < test_fraction with u(f) = int(sha256(f"{seed}:{f}")[:8 bytes], big endian) / 2**64,
else in `train`. A file's split depends on its own path and the seed only, so
adding or removing files never moves another file between splits; the test
fraction is exact in expectation (not stratified by class).

The dataset is DATA_DIR/NAME/1.0.0 (features `image` uint8 [size, size, 3] and,
with classes, `label` with the class names), plus `diffusax_prepare.json`
(the build's parameters, class names, counts and skipped files), which is what
`data.registry.prepared_builder` looks for. It is built under a temporary
DATA_DIR/.prepare-NAME.* folder and renamed into place at the very end, so a
failed or killed build leaves nothing that opens as a dataset (the temporary
folder of a killed build is removed by the next build of NAME on that host).
A DATA_DIR on an object store (gs://BUCKET/PATH, which has no rename) is built
in a local temporary folder and copied up file by file, `diffusax_prepare.json`
last and committed (storage.commit), so there too a dataset opens only whole.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from diffusax import storage
from diffusax.data import registry

VERSION = "1.0.0"
MIN_SIZE = 8
FORMATS = ("JPEG", "PNG", "WEBP")            # Accepted input formats (PIL's names, detected from content).
ENCODINGS = {"png": "PNG", "jpeg": "JPEG"}   # --encoding -> PIL format of the stored examples.
JPEG_QUALITY = 95
ON_ERROR = ("refuse", "skip")
NAME_RE = re.compile(r"[a-z][a-z0-9_]*")     # TFDS-style dataset names.
SPLIT_RULE = "test iff int.from_bytes(sha256(f'{seed}:{relpath}').digest()[:8], 'big') / 2**64 < test_fraction"


class PrepareError(ValueError):
  """Bad input to the builder: reported as one line `diffusax: error: ...` with exit status 2."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One input file: its path relative to the images folder ('/'-separated) and its label (None: unlabelled)."""
  relpath: str
  label: int | None


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a folder holds: class names (None: unlabelled), candidate files, files outside any class folder."""
  class_names: tuple[str, ...] | None
  items: tuple[Item, ...]
  misplaced: tuple[str, ...]


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _files_under(root: str, sub: str) -> list[str]:
  """Visible files under root/sub, recursively, as sorted '/'-separated paths relative to root."""
  out = []
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub), followlinks=True):
    dirnames[:] = [d for d in dirnames if _visible(d)]
    rel = os.path.relpath(dirpath, root)
    out += [os.path.join(rel, f).replace(os.sep, "/") for f in filenames if _visible(f)]
  return sorted(out)


def scan(images: str) -> Layout:
  """Class folders and files of `images` (ImageFolder rule; hidden names ignored). Raises PrepareError."""
  if not os.path.isdir(images):
    raise PrepareError(f"--images={images} is not a directory" if os.path.exists(images)
                       else f"--images={images} does not exist")
  entries = sorted(e for e in os.listdir(images) if _visible(e))
  classes = [e for e in entries if os.path.isdir(os.path.join(images, e))]
  top = [e for e in entries if not os.path.isdir(os.path.join(images, e))]
  if not classes:
    if not top:
      raise PrepareError(f"--images={images} holds no files")
    return Layout(None, tuple(Item(f, None) for f in top), ())
  items = []
  for label, c in enumerate(classes):
    files = _files_under(images, c)
    if not files:
      raise PrepareError(f"class folder {c!r} of --images={images} holds no files")
    items += [Item(f, label) for f in files]
  return Layout(tuple(classes), tuple(items), tuple(top))


def split_of(relpath: str, seed: int, test_fraction: float) -> str:
  """'test' or 'train' by the rule in the module docstring (SPLIT_RULE)."""
  u = int.from_bytes(hashlib.sha256(f"{seed}:{relpath}".encode()).digest()[:8], "big") / 2.0 ** 64
  return "test" if u < test_fraction else "train"


def _open(path: str) -> Image.Image:
  """The file as a PIL image of an accepted format; raises ValueError/OSError otherwise (lazy: not decoded)."""
  im = Image.open(path)
  if im.format not in FORMATS:
    fmt = im.format
    im.close()
    raise ValueError(f"not a JPEG/PNG/WebP image ({fmt})")
  return im


def load(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: EXIF-oriented RGB, short side resized to `size` (bicubic, antialiased), centre crop."""
  with _open(path) as im:
    im = ImageOps.exif_transpose(im).convert("RGB")
  w, h = im.size
  nw, nh = (max(size, round(w * size / h)), size) if w >= h else (size, max(size, round(h * size / w)))
  im = im.resize((nw, nh), Image.Resampling.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return np.asarray(im.crop((left, top, left + size, top + size)))


def check(path: str, size: int) -> str | None:
  """None if `path` decodes as an accepted image, else the reason. JPEGs decode at reduced scale (draft):
  the whole stream is still read, so truncation and bad data are found at a fraction of the cost."""
  try:
    with _open(path) as im:
      if im.format == "JPEG":
        im.draft("RGB", (size, size))
      im.load()
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; each is reported by name.
    return _reason(e)
  return None


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  text = re.sub(r"^\[Errno \d+\] ", "", text)
  return re.sub(r" ?'?/[^ ]*'?$", "", text) if text.startswith("cannot identify image file") else text


def encode(image: np.ndarray, encoding: str) -> bytes:
  """PNG (lossless; zlib level 1: half the time of level 6 for ~5% more bytes on photos) or JPEG
  (quality JPEG_QUALITY, 4:4:4: no chroma subsampling) bytes of a uint8 [H, W, 3] array."""
  buf = io.BytesIO()
  kwargs = {"quality": JPEG_QUALITY, "subsampling": 0} if encoding == "jpeg" else {"compress_level": 1}
  Image.fromarray(image).save(buf, format=ENCODINGS[encoding], **kwargs)
  return buf.getvalue()


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
  """fn over items in `workers` threads, results in input order, at most 4*workers in flight.

  PIL releases the GIL while decoding, resizing and encoding, so threads run in parallel.
  """
  if workers <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    window = collections.deque()
    for it in items:
      window.append(pool.submit(fn, it))
      if len(window) >= 4 * workers:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


def _progress(total: int, desc: str):
  from tqdm import tqdm
  # disable=None: shown on a terminal, silent when stderr is a file or a pipe (logs, CI).
  return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, disable=None)


def _builder_class(name: str):
  """A GeneratorBasedBuilder named `name`, kept out of TFDS' registry (built here, read by directory)."""
  import tensorflow_datasets as tfds

  class FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images of a folder, resized and centre-cropped (diffusax.data.prepare)."""
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Built by python -m diffusax.data.prepare."}

    def __init__(self, *, plan: "_Plan", **kwargs):
      self._plan = plan
      super().__init__(file_format="array_record", **kwargs)

    def _info(self):
      p = self._plan
      feats = {"image": tfds.features.Image(shape=(p.size, p.size, 3), dtype=np.uint8, encoding_format=p.encoding)}
      if p.class_names is not None:
        feats["label"] = tfds.features.ClassLabel(names=list(p.class_names))
      return tfds.core.DatasetInfo(
          builder=self, description=f"Images of {p.images}, {p.size}x{p.size} centre crops (diffusax.data.prepare).",
          features=tfds.features.FeaturesDict(feats))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split, items in self._plan.splits.items() if items}

    def _generate_examples(self, split):
      yield from self._plan.examples(split)

  FolderImages.name = name
  return FolderImages


@dataclasses.dataclass
class _Plan:
  """Everything the build writes: which files go to which split, and how an example is made."""
  images: str
  size: int
  encoding: str
  class_names: tuple[str, ...] | None
  splits: dict[str, list[Item]]
  workers: int
  on_error: str
  skipped: list[tuple[str, str]]
  convert: Callable[[str, int], np.ndarray] = load

  def _example(self, item: Item):
    try:
      image = self.convert(os.path.join(self.images, item.relpath), self.size)
    except Exception as e:  # noqa: BLE001 - a file that passed the check but fails to convert.
      return item, None, _reason(e)
    return item, encode(image, self.encoding), None

  def examples(self, split: str):
    """(key, example) of every file of `split`; key = relative path (TFDS orders a split by key hash)."""
    items = self.splits[split]
    with _progress(len(items), f"converting {split}") as bar:
      for item, data, err in ordered_map(self._example, items, self.workers):
        bar.update(1)
        if err is not None:
          if self.on_error == "refuse":
            raise PrepareError(f"{item.relpath} failed to convert: {err}; nothing was written "
                               f"(--on_error=skip leaves such files out)")
          self.skipped.append((item.relpath, err))
          continue
        ex = {"image": data}
        if item.label is not None:
          ex["label"] = item.label
        yield item.relpath, ex


def _bad_line(bad: list[tuple[str, str]], limit: int = 20) -> str:
  shown = ", ".join(f"{f} ({why})" for f, why in bad[:limit])
  return shown + (f", and {len(bad) - limit} more" if len(bad) > limit else "")


def _is_prepared_dir(path: str) -> bool:
  return any(storage.committed(storage.join(path, v, registry.PREPARED_MARKER)) for v in storage.listdir(path))


def _tmp_prefix(name: str) -> str:
  return f".prepare-{name}.{socket.gethostname()}."


def _remove_stale(data_dir: str, name: str) -> None:
  """Removes temporary folders of killed builds of `name` on this host (their process is gone)."""
  prefix = _tmp_prefix(name)
  for e in os.listdir(data_dir):
    m = re.fullmatch(re.escape(prefix) + r"(\d+)\..*", e)
    if not m:
      continue
    try:
      os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(data_dir, e), ignore_errors=True)
    except PermissionError:
      pass  # Alive, someone else's.


def validate(images: str, name: str, size: int, data_dir: str, test_fraction: float, overwrite: bool) -> str:
  """Checks the arguments (not the files); returns the absolute data_dir. Raises PrepareError."""
  if not name:
    raise PrepareError("--name is required: the dataset's name, used as --config.data.name=NAME")
  if not NAME_RE.fullmatch(name):
    raise PrepareError(f"--name={name!r} must be lower case letters, digits and '_', starting with a letter")
  if name in registry.EMBEDDED:
    raise PrepareError(f"--name={name} is an embedded dataset ({list(registry.EMBEDDED)}); choose another name")
  if size < MIN_SIZE:
    raise PrepareError(f"--size={size} is too small; it must be >= {MIN_SIZE}")
  if not 0.0 <= test_fraction < 1.0:
    raise PrepareError(f"--test_fraction={test_fraction} must be in [0, 1)")
  if not images:
    raise PrepareError("--images is required: a folder of images (class sub-folders give labels)")
  if storage.is_remote(data_dir):
    try:
      data_dir = storage.probe(data_dir, "--data_dir")
    except storage.StorageError as e:
      raise PrepareError(str(e)) from None
  data_dir = storage.resolve(data_dir)
  if not storage.is_remote(data_dir) and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise PrepareError(f"--data_dir={data_dir} is a file, not a directory")
  target = storage.join(data_dir, name)
  if os.path.lexists(target) if not storage.is_remote(target) else storage.listdir(target):
    if not _is_prepared_dir(target):
      raise PrepareError(f"{target} exists and was not made by diffusax.data.prepare; not replacing it")
    if not overwrite:
      raise PrepareError(f"dataset {name} already exists in {data_dir}; pass --overwrite to rebuild it")
  return data_dir


def prepare(images: str, name: str, size: int, data_dir: str, *, on_error: str = "refuse",
            test_fraction: float = 0.1, encoding: str = "png", seed: int = 0, overwrite: bool = False,
            workers: int | None = None, convert: Callable[[str, int], np.ndarray] = load) -> dict:
  """Builds the dataset (see the module docstring); returns the summary stored in diffusax_prepare.json.

  Raises PrepareError for bad arguments and, with on_error='refuse', for bad files: then nothing is
  written. `convert(path, size) -> uint8 [size, size, 3]` is the per-image conversion (tests replace it).
  """
  if on_error not in ON_ERROR:
    raise PrepareError(f"--on_error={on_error} must be one of {list(ON_ERROR)}")
  if encoding not in ENCODINGS:
    raise PrepareError(f"--encoding={encoding} must be one of {list(ENCODINGS)}")
  data_dir = validate(images, name, size, data_dir, test_fraction, overwrite)
  images = os.path.abspath(os.path.expanduser(images))
  layout = scan(images)
  workers = workers or min(8, os.cpu_count() or 1)
  start = time.perf_counter()
  bad = [(f, "not inside a class folder") for f in layout.misplaced]
  with _progress(len(layout.items), "checking") as bar:
    for item, why in zip(layout.items, ordered_map(lambda it: check(os.path.join(images, it.relpath), size),
                                                   layout.items, workers)):
      bar.update(1)
      if why is not None:
        bad.append((item.relpath, why))
  if bad and on_error == "refuse":
    raise PrepareError(f"{len(bad)} of {len(layout.items) + len(layout.misplaced)} files in {images} are not "
                       f"readable JPEG/PNG/WebP images: {_bad_line(bad)}; nothing was written "
                       f"(fix or remove them, or pass --on_error=skip)")
  bad_names = {f for f, _ in bad}
  good = [it for it in layout.items if it.relpath not in bad_names]
  if not good:
    raise PrepareError(f"none of the files in {images} is a readable JPEG/PNG/WebP image")
  splits = {"train": [], "test": []}
  for it in good:
    splits[split_of(it.relpath, seed, test_fraction)].append(it)
  if not splits["train"] or (test_fraction > 0 and not splits["test"]):
    empty = "train" if not splits["train"] else "test"
    raise PrepareError(f"the {empty} split would be empty ({len(good)} images, --test_fraction={test_fraction}, "
                       f"--seed={seed}); try another --seed or --test_fraction (0: no test split)")
  for f, why in bad:
    print(f"diffusax: skipping {f}: {why}", file=sys.stderr)
  plan = _Plan(images, size, encoding, layout.class_names, splits, workers, on_error, list(bad), convert)

  import tensorflow_datasets as tfds  # Deferred: seconds to import; argument errors come first.
  from tensorflow_datasets.core.utils import tqdm_utils
  remote = storage.is_remote(data_dir)
  if not remote:
    os.makedirs(data_dir, exist_ok=True)
    _remove_stale(data_dir, name)
  tmp = tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{os.getpid()}.", dir=None if remote else data_dir)
  bars = getattr(tqdm_utils, "_active", True)
  try:
    tfds.display_progress_bar(False)  # This module's own bars show the conversion.
    builder = _builder_class(name)(plan=plan, data_dir=tmp)
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints the temporary folder's path.
      builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
    counts = {k: int(v.num_examples) for k, v in builder.info.splits.items()}
    summary = {
        "name": name, "version": VERSION, "images": images, "size": size, "encoding": encoding,
        "seed": seed, "test_fraction": test_fraction, "split_rule": SPLIT_RULE,
        "class_names": list(layout.class_names) if layout.class_names is not None else None,
        "num_examples": counts, "skipped": [list(b) for b in plan.skipped],
        "seconds": round(time.perf_counter() - start, 3),
    }
    with open(os.path.join(tmp, name, VERSION, registry.PREPARED_MARKER), "w") as f:
      json.dump(summary, f, indent=1)
    if remote:
      _upload(os.path.join(tmp, name), storage.join(data_dir, name), overwrite)
      return summary
    target, old = os.path.join(data_dir, name), os.path.join(tmp, "replaced")
    if os.path.lexists(target):
      if not (overwrite and _is_prepared_dir(target)):
        raise PrepareError(f"{target} appeared during the build; not replacing it")
      os.rename(target, old)
    os.rename(os.path.join(tmp, name), target)
  finally:
    tfds.display_progress_bar(bars)
    shutil.rmtree(tmp, ignore_errors=True)
  return summary


def _upload(built: str, target: str, overwrite: bool) -> None:
  """Copies the finished local build to `target` on an object store, its marker last (committed)."""
  if storage.listdir(target):
    if not (overwrite and _is_prepared_dir(target)):
      raise PrepareError(f"{target} appeared during the build; not replacing it")
    storage.rmtree(target)
  storage.copy_tree(built, target, last=f"{VERSION}/{registry.PREPARED_MARKER}")


# Flags in their own FlagValues: importing this module adds nothing to absl's global flags.
def _define_flags():
  from absl import flags
  fv = flags.FlagValues()
  flags.DEFINE_string("images", None, "Folder of JPEG/PNG/WebP images; its sub-folders are the classes.", flag_values=fv)
  flags.DEFINE_string("name", None, "Dataset name (lower case, digits, '_'); train with --config.data.name=NAME.",
                      flag_values=fv)
  flags.DEFINE_integer("size", 64, "Side of the square examples (short side resize, then centre crop).", flag_values=fv)
  flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Where the dataset is written (config.data.data_dir).",
                      flag_values=fv)
  flags.DEFINE_string("on_error", "refuse", "Bad files: 'refuse' (write nothing) or 'skip' (leave them out).",
                      flag_values=fv)
  flags.DEFINE_float("test_fraction", 0.1, "Expected fraction of files in the test split, in [0, 1).", flag_values=fv)
  flags.DEFINE_string("encoding", "png", "Stored encoding: 'png' (lossless) or 'jpeg' (quality 95).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the train/test split.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace an existing dataset NAME made by this tool.", flag_values=fv)
  flags.DEFINE_integer("workers", 0, "Conversion threads (0: min(8, CPU count)).", flag_values=fv)
  return fv


def _error(msg: str):
  print(f"diffusax: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv: list[str] | None = None) -> dict:
  """The command line: parses argv (default sys.argv), builds, prints a summary; bad input exits 2."""
  from absl import flags, logging
  argv = sys.argv if argv is None else argv
  fv = _define_flags()
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print("\n\n".join(__doc__.split("\n\n")[:2]) + "\n\n" + fv.get_help(include_special_flags=False))
    sys.exit(0)
  try:
    rest = fv(argv)
  except flags.Error as e:
    _error(e)
  if len(rest) > 1:
    _error(f"unexpected arguments {rest[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    s = prepare(fv.images, fv.name, fv.size, fv.data_dir, on_error=fv.on_error, test_fraction=fv.test_fraction,
                encoding=fv.encoding, seed=fv.seed, overwrite=fv.overwrite, workers=fv.workers or None)
  except PrepareError as e:
    _error(e)
  n = sum(s["num_examples"].values())
  classes = f"{len(s['class_names'])} classes" if s["class_names"] is not None else "unlabelled"
  counts = ", ".join(f"{k} {v}" for k, v in s["num_examples"].items())
  print(f"prepared {s['name']}: {counts}, {classes}, {len(s['skipped'])} skipped, "
        f"{n / max(s['seconds'], 1e-9):.0f} images/s -> {storage.join(storage.resolve(fv.data_dir), s['name'])}\n"
        f"train with --config.data.name={s['name']} --config.data.data_dir={fv.data_dir}")
  return s


if __name__ == "__main__":
  main()
