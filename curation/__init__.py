"""webcurate.curation"""
