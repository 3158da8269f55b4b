"""What the crosscoder's features are and when they form: decoder-norm timelines, peak / emergence /
direction turns, probes (type scores, top contexts), feature figures, the browser and the analyze stage.
Imports `evolution.sources`, never a later stage."""
