"""Linearity as an intervention across snapshots: linear replacement and removal of blocks, pruning,
the logit lens, and the logit effects of crosscoder features."""
