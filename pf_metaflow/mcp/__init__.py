"""Purple Flea escrow over MCP: the sandbox's ``/mcp`` endpoint and the step-side agent toolkit.

    from pf_metaflow.mcp import agent_escrow_tools   # in a step: escrow tools for an agent
    from pf_metaflow.mcp import mcp_asgi_app         # the sandbox's /mcp (an ASGI app)

Needs the ``mcp`` extra (``pip install 'pf-metaflow[mcp]'``). Names load lazily, so
``pf_metaflow.mcp.context`` (imported by ``@pf_escrow_step`` in every task) never pulls in
the MCP SDK.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "agent_escrow_tools": "pf_metaflow.mcp.toolkit",
    "AgentEscrowTools": "pf_metaflow.mcp.toolkit",
    "AgentSettlementError": "pf_metaflow.mcp.toolkit",
    "ToolResult": "pf_metaflow.mcp.toolkit",
    "mcp_asgi_app": "pf_metaflow.mcp.server",
    "build_server": "pf_metaflow.mcp.server",
    "EngineTools": "pf_metaflow.mcp.server",
    "McpConnection": "pf_metaflow.mcp.client",
    "McpEscrowClient": "pf_metaflow.mcp.client",
    "TOOL_NAMES": "pf_metaflow.mcp.tools",
    "live_tools": "pf_metaflow.mcp.tools",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pf_metaflow.mcp' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "mcp":
            raise ModuleNotFoundError(
                "pf_metaflow.mcp needs the MCP SDK: pip install 'pf-metaflow[mcp]'", name=exc.name) from exc
        raise
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
