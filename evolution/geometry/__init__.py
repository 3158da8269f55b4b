"""Layer geometry per snapshot: linearity (± residual), anisotropy, intrinsic dimension, and the geometry
stage. Imports `evolution.sources`, never a later stage."""
