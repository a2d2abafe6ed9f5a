"""Example labelling functions for ``webcurate label``.

    webcurate label --input DATASET --lfs docs/examples/lfs_example.py --output OUT

An LF gets one sample record ``x`` (``x.caption``, ``x.url``, ``x.width``,
``x.height``, any index/json field, ``x.embedding`` and ``x.level_1`` ... when
the ``embeddings``/``clusters`` sidecars exist, ``x.image`` for the decoded
picture) and returns a class index, a class name, or ABSTAIN (-1).

Every LF object at top level of this file is used (or list them in
``LFS = [...]``). Functions written for Snorkel
(``from snorkel.labeling import labeling_function``) work unchanged.
"""
import re

from webcurate.curation.labeling import ABSTAIN, labeling_function
from webcurate.curation.labeling import factories as F

CLASSES = ["cat", "dog", "bird"]
CAT, DOG, BIRD = range(len(CLASSES))


# 1. Hand-written rules. ---------------------------------------------------
@labeling_function()
def wide_photo_of_sky(x):
    """Any field of the record is available: here size and caption together."""
    if x.width and x.height and x.width / x.height > 1.6 and "sky" in (x.caption or "").lower():
        return BIRD
    return ABSTAIN


@labeling_function(resources={"lexicon": {"meow": CAT, "purr": CAT, "woof": DOG, "bark": DOG,
                                          "tweet": BIRD, "chirp": BIRD}})
def animal_sounds(x, lexicon):
    """Resources are passed as keyword arguments, as in Snorkel."""
    words = re.findall(r"[a-z]+", (x.caption or "").lower())
    votes = {lexicon[w] for w in words if w in lexicon}
    return votes.pop() if len(votes) == 1 else ABSTAIN


# 2. Built-in factories. -----------------------------------------------------
keyword_rules = F.keyword_lfs({"cat": ["cat", "kitten"], "dog": ["dog", "puppy"], "bird": ["bird", "sparrow"]},
                              CLASSES)
domain_rule = F.domain_lf({"cats.example.org": "cat", "dogs.example.com": "dog", "birds.example.net": "bird"},
                          CLASSES)
wide_is_bird = F.size_lf("bird", CLASSES, min_aspect=1.4, name="wide_is_bird")

# 3. Embedding LFs from a small labelled seed dataset embedded with the same
#    model (`webcurate embed` on both). Set the path to use them.
SEED_DATASET = None  # e.g. "s3://my-bucket/pets-seed"
if SEED_DATASET:
    seed = F.load_seed(SEED_DATASET, CLASSES)
    knn_seed = F.knn_lf(seed, k=5, margin=0.3)
    prototype = F.prototype_lf(seed, margin=0.05)
