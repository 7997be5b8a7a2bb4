"""The disk layer: a disk image written on a plain file.

A GPT from sfdisk (gpt.py), filesystems made straight from a tree at their
offsets (filesystems.py), GRUB's BIOS boot code (biosboot.py) and sparse
copies (sparse.py). No loop devices, no partition device nodes, no
device-mapper, no mounts.
"""
