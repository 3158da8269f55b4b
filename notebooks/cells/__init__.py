"""Cell sources of the research notebooks, one module per notebook (built by notebooks/build.py)."""
