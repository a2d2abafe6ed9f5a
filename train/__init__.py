"""webcurate.train"""
