"""webcurate.train.losses"""
