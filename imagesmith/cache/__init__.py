"""The cache layer: what a build keeps for the next one.

- stages.py: finished package-stage trees, under a key of their inputs;
- index.py: the archive index state that goes into that key;
- initramfs.py: built initramfs images, reused while nothing they hold changed;
- admin.py: `imagesmith cache list|prune`;
- entries.py: the one way an entry is written (atomically) and locked.
"""
