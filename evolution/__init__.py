"""The study of training dynamics: snapshots, pre-training, timelines, geometry and phases."""
