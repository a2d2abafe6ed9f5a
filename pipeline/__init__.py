"""webcurate.pipeline"""
