"""The default tool registry: the built-in tools, the sub-agent tools and every plug-in of the
`chatd.tools` entry point group. It lives apart from registry.py because it imports the tool
modules, which import registry.py: assembling here keeps the imports one-way."""

from __future__ import annotations

from importlib.metadata import entry_points

from app.log import get_logger
from app.tools.agent_tools import register_subagent_tools
from app.tools.builtin import register_builtin_tools
from app.tools.registry import ENTRY_POINT_GROUP, ToolRegistry

log = get_logger(__name__)


def default_registry() -> ToolRegistry:
    """The built-in tools plus every plug-in of the `chatd.tools` entry point group."""
    registry = ToolRegistry()
    register_builtin_tools(registry)
    register_subagent_tools(registry)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()(registry)
        log.info("tools.plugin_loaded", plugin=entry_point.name)
    return registry
