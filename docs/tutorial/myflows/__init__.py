"""The flowbench tutorial's flow as a package: ``myflows.flow:SPEC`` is its entry point (see ../pyproject.toml)."""
