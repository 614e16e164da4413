"""An entry file that raises while it runs."""

raise ValueError("bad module-level code")
