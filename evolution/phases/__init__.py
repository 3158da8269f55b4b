"""The statistical and feature phases: loss against the corpus's references, phase signals from loss,
geometry and crosscoder, and the phase map. Imports the earlier stages, never `evolution.report`."""
