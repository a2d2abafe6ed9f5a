"""An LF file written for Snorkel, unchanged (the compatibility tests load it as data)."""
from snorkel.labeling import labeling_function

ABSTAIN, CAT, DOG = -1, 0, 1
CLASSES = ["cat", "dog", "bird"]

@labeling_function()
def lf_cat(x):
    return CAT if "cat" in x.caption.lower() else ABSTAIN

@labeling_function(resources=dict(words=["dog", "puppy"]))
def lf_dog(x, words):
    return DOG if any(w in x.caption.lower() for w in words) else ABSTAIN
