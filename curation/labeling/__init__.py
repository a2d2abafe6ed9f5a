"""Weak labelling: labelling functions, LF analysis, label model, pseudo-labelled export."""
