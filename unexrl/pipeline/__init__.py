"""Library logic of the continuous-training pipeline (components/ and pipelines/ are thin shells over it).

No kfp here: every function takes paths and plain values, so it runs the same under kfp.local, in a cluster pod
and in a test.
"""
