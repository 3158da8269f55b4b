"""The run report: one self-contained HTML page built from what the other stages wrote."""
