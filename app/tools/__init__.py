"""Tools the model can call: a registry (registry.py), a few safe built-ins (builtin.py), the
sub-agent tools (subagents.py), the default registry that assembles them (defaults.py), and a
plug-in point for more (entry points in the `chatd.tools` group)."""
