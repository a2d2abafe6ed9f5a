"""An LF file written for Snorkel (used by the compatibility tests as data)."""
try:
    from snorkel.labeling import labeling_function
except ImportError:  # snorkel not installed: the same interface, duck-typed
    class LabelingFunction:
        def __init__(self, name, f, resources=None):
            self.name, self._f, self._resources = name, f, resources or {}
        def __call__(self, x):
            return self._f(x, **self._resources)

    def labeling_function(name=None, resources=None, pre=None):
        return lambda f: LabelingFunction(name or f.__name__, f, resources)

ABSTAIN, CAT, DOG = -1, 0, 1
CLASSES = ["cat", "dog", "bird"]

@labeling_function()
def lf_cat(x):
    return CAT if "cat" in x.caption.lower() else ABSTAIN

@labeling_function(resources=dict(words=["dog", "puppy"]))
def lf_dog(x, words):
    return DOG if any(w in x.caption.lower() for w in words) else ABSTAIN
