"""A small web-like corpus of real photos for `webcurate demo`, served on loopback.

Source photos: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
when installed (10 labelled classes), else scikit-image's bundled photos
(random crops, one class per source photo). The web-like part: noisy
captions (some missing, some wrong), planted near-duplicates (re-encoded,
slightly cropped copies), and broken links (404s and an HTML page), all
behind a real HTTP server on 127.0.0.1.
"""
from __future__ import annotations

import gzip
import http.server
import io
import os
import random
import threading
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
SKIMAGE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "retina", "immunohistochemistry"]


@dataclass
class DemoCorpus:
    folder: str  # served over HTTP
    url_list: str  # parquet: url, caption, + metadata
    seed_dir: str  # ImageFolder of a few labelled images per class (the kNN / prototype LFs' seed)
    dev_dir: str  # ImageFolder of other labelled images per class (dev set: never seen by an LF)
    classes: list[str]
    source: str  # "fashion-mnist" or "scikit-image"
    n_pool: int
    n_duplicates: int
    n_broken: int
    n_distractors: int = 0


def _fashion_images(n_per_class: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    with gzip.open(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    out, ys = [], []
    for c in range(10):
        idx = rng.choice(np.flatnonzero(labels == c), n_per_class, replace=False)
        for i in idx:
            # 28 px grey -> 64 px RGB with a per-image tint, so colour is not constant.
            g = np.asarray(Image.fromarray(images[i]).resize((64, 64), Image.BICUBIC), np.float32) / 255.0
            tint = rng.uniform(0.6, 1.0, size=3)
            bg = rng.uniform(0.0, 0.25, size=3)
            rgb = (g[..., None] * tint + (1 - g[..., None]) * bg) * 255
            out.append(rgb.clip(0, 255).astype(np.uint8))
            ys.append(c)
    return out, ys


def _skimage_images(n_per_class: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int], list[str]]:
    import skimage.data as data

    out, ys, names = [], [], []
    for name in SKIMAGE_PHOTOS:
        try:
            img = getattr(data, name)()
        except Exception:
            continue  # photo not bundled in this scikit-image version
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = np.asarray(img[..., :3], np.uint8)
        c = len(names)
        names.append(name)
        h, w = img.shape[:2]
        for _ in range(n_per_class):
            side = int(rng.uniform(0.35, 0.8) * min(h, w))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(img[y:y + side, x:x + side]).resize((96, 96), Image.BICUBIC)
            out.append(np.asarray(crop))
            ys.append(c)
    return out, ys, names


def _distractor(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A web-style non-photo: a flat banner with stripes and noise (belongs to no class)."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(0, 255, size=3)
    period = int(rng.integers(4, 12))
    stripes = (np.arange(size) // period) % 2 == 0
    img[stripes] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 12, size=img.shape)
    return img.clip(0, 255).astype(np.uint8)


def build_corpus(workdir: str, n_per_class: int = 40, n_seed_per_class: int = 5, seed: int = 0,
                 n_dev_per_class: int = 5, n_distractors: int = 12) -> DemoCorpus:
    """Write the corpus under ``workdir``; returns where everything is."""
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    n_labelled = n_seed_per_class + n_dev_per_class
    if os.path.isdir(FASHION_DIR):
        images, labels = _fashion_images(n_per_class + n_labelled, rng)
        classes, source = FASHION_CLASSES, "fashion-mnist"
    else:
        images, labels, classes = _skimage_images(n_per_class + n_labelled, rng)
        source = "scikit-image"
    folder = os.path.join(workdir, "web")
    seed_dir = os.path.join(workdir, "seed")
    dev_dir = os.path.join(workdir, "dev")
    os.makedirs(folder, exist_ok=True)
    rows = []
    seen_per_class: dict[int, int] = {}
    for i, (img, y) in enumerate(zip(images, labels)):
        k = seen_per_class.get(y, 0)
        seen_per_class[y] = k + 1
        if k < n_labelled:  # a few labelled examples per class: seed, then dev
            d = os.path.join(seed_dir if k < n_seed_per_class else dev_dir, classes[y])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{i:05d}.jpg"), quality=95)
            continue
        name = f"img{i:05d}.jpg"
        Image.fromarray(img).save(os.path.join(folder, name), quality=92)
        roll = pyrng.random()
        if roll < 0.55:
            caption = f"a photo of a {classes[y]}"
        elif roll < 0.65:
            caption = f"a photo of a {classes[pyrng.randrange(len(classes))]}"  # wrong caption
        else:
            caption = None
        rows.append({"name": name, "caption": caption, "true_label": classes[y]})
    # Near-duplicates: re-encoded and slightly cropped copies of some photos.
    n_dup = max(1, len(rows) // 10)
    for j, r in enumerate(pyrng.sample(rows, n_dup)):
        src = Image.open(os.path.join(folder, r["name"]))
        w, h = src.size
        dup = src.crop((1, 1, w - 1, h - 1)).resize((w, h), Image.BICUBIC)
        name = f"dup{j:04d}.jpg"
        dup.save(os.path.join(folder, name), quality=75)
        rows.append({"name": name, "caption": r["caption"], "true_label": r["true_label"]})
    # Distractors: banners and ads that belong to no class, some with misleading captions.
    for j in range(n_distractors):
        name = f"ad{j:04d}.jpg"
        Image.fromarray(_distractor(rng)).save(os.path.join(folder, name), quality=85)
        caption = "buy now" if j % 2 else f"best {classes[j % len(classes)]} deals"
        rows.append({"name": name, "caption": caption, "true_label": None})
    # Broken links: missing files and an HTML page posing as an image.
    with open(os.path.join(folder, "page.jpg"), "wb") as f:
        f.write(b"<html><body>not an image</body></html>")
    broken = [{"name": f"missing{j}.jpg", "caption": None, "true_label": None} for j in range(3)]
    broken.append({"name": "page.jpg", "caption": "a page", "true_label": None})
    rows += broken
    pyrng.shuffle(rows)
    table = pa.table({
        "url": [f"{{base}}/{r['name']}" for r in rows],
        "caption": [r["caption"] for r in rows],
        "true_label": [r["true_label"] for r in rows],
    })
    url_list = os.path.join(workdir, "urls.parquet")
    pq.write_table(table, url_list)
    return DemoCorpus(folder, url_list, seed_dir, dev_dir, list(classes), source,
                      n_pool=len(rows) - len(broken) - n_dup, n_duplicates=n_dup, n_broken=len(broken),
                      n_distractors=n_distractors)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the demo's output readable
        pass


class LoopbackServer:
    """Serve a folder on 127.0.0.1 (ephemeral port) in a thread; a context manager."""

    def __init__(self, folder: str):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=folder))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def materialise_url_list(template_list: str, base_url: str, out_path: str) -> str:
    """Fill the ``{base}`` placeholder of the corpus URL list with the server's URL."""
    t = pq.read_table(template_list)
    urls = [u.replace("{base}", base_url) for u in t["url"].to_pylist()]
    t = t.set_column(t.column_names.index("url"), "url", pa.array(urls))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    with open(out_path, "wb") as f:
        f.write(buf.getvalue())
    return out_path
