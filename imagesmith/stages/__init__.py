"""The stages of a build, one module each, in pipeline order (build.py's
STAGES): bootstrap, customize, bootsetup, finalize, assemble_disk,
assemble_container, then outputs. Each says in its docstring what it needs
and what it produces."""
