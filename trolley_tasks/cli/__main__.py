"""``python -m trolley_tasks.cli``: the same as the ``trolley-tasks`` command (embedded mode starts workers so)."""

from trolley_tasks.cli import main

main()
