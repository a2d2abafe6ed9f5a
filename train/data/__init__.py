"""webcurate.train.data"""
