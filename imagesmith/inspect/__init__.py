"""The inspect layer: looking at config spaces and built images.

The hygiene scan (verify.py), reading a tree out of a built image without
mounting it (imagefiles.py), booting and testing images in QEMU (qemu.py,
vmtest.py), `imagesmith lint` (lint.py) and `imagesmith summary`
(summary.py).
"""
