"""``make bench``: the export speed of trolley-tasks against plain clients and dicomtrolley (see bench/run.py)."""
