"""Serving an SDK ``MCPServer`` with the session layer: the server side, one module per job.

Theory of operation
===================

This module only gathers the names; each job lives in its own module:

- ``_context``: what a tool sees (:class:`SessionContext`, :func:`current_session`),
  the request context variables the layer writes, log correlation, and how a
  session error keeps its code through the SDK;
- ``_layer``: :class:`SessionLayer`, the ``ServerMiddleware`` that runs every
  request in its session (connection sessions, handles, the era);
- ``_tools``: the six built-in session tools;
- ``_resources``: ``sessions://health`` and ``sessions://metrics``;
- ``_stdio``: :func:`serve_stdio` / :func:`run_stdio`, wiring the transport,
  the supervisor, the layer and the SDK's ``Server.run`` together.

Imports go one way: ``_stdio`` -> ``_layer``, ``_tools``, ``_resources`` -> ``_context``.
"""

from __future__ import annotations

from ._context import CorrelationFilter, SessionContext, current_session, session_context
from ._layer import SessionLayer
from ._resources import HEALTH_URI, METRICS_URI, install_session_resources
from ._stdio import default_principal, run_stdio, serve_connection, serve_stdio
from ._tools import SESSION_TOOLS, install_session_tools

__all__ = [
    "HEALTH_URI",
    "METRICS_URI",
    "SESSION_TOOLS",
    "CorrelationFilter",
    "SessionContext",
    "SessionLayer",
    "current_session",
    "default_principal",
    "install_session_resources",
    "install_session_tools",
    "run_stdio",
    "serve_connection",
    "serve_stdio",
    "session_context",
]
