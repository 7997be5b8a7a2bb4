"""The host layer: how imagesmith touches the build host.

Running commands (run.py), the sandbox that runs them inside an image root
(sandbox.py, enter.py), paths inside an image tree that never lead out of it
(paths.py), and the host's apt sources (aptsources.py). Nothing here knows
about images, classes or stages.
"""
