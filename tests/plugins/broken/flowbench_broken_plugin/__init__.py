"""A plugin whose import fails (test fixture)."""

raise ImportError("flowbench_broken_plugin needs the package 'nonexistent-dependency'")
