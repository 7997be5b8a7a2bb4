"""Helpers that write parts of an image tree: accounts, network files, apt
sources, GRUB and the initramfs. The stages in stages/ call them; each takes
the tree and the typed config it needs, never the whole build context.
"""
