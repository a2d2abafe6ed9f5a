"""Small image folders and configs for the training-loop tests (loaded by path, not a conftest)."""
from __future__ import annotations

import io
import os

from PIL import Image
from photos import make_photo

TINY = ["model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=48", "model.depth=2",
        "model.num_heads=2", "model.layerscale=null", "dino.n_prototypes=128", "dino.hidden_dim=64",
        "dino.bottleneck_dim=32", "loader.global_size=32", "loader.local_size=16", "loader.n_local=2",
        "loader.batch_size=4", "loader.num_threads=1", "loader.shuffle_buffer=8", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "teacher.warmup_temp_epochs=1", "optim.freeze_last_layer_epochs=0.5",
        "run.num_workers=2", "run.report_every=100", "run.torch_threads=1"]


def image_tree(root: str, classes: int = 3, per_class: int = 8) -> str:
    """An ImageFolder tree of JPEGs; returns ``root``."""
    for c in range(classes):
        d = os.path.join(root, f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(make_photo(100 * c + i, (64, 48), cell=16)).save(buf, format="JPEG", quality=90)
            with open(os.path.join(d, f"{i:03d}.jpg"), "wb") as f:
                f.write(buf.getvalue())
    return root
