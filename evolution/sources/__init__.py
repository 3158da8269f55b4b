"""Where snapshots come from: corpora (generated with planted mechanisms, local text, HF datasets),
tokenizers, the corpus's loss references, pre-training a mini-Pythia, and snapshot sources
(`pretrain`, `local:<dir>`, `hf:<model>`). Imports nothing from the later stages."""
