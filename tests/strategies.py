"""Shared Hypothesis strategies."""

from __future__ import annotations

from hypothesis import strategies as st

from mcp_sessions._state import Event, SessionState, TerminationReason

states = st.sampled_from(SessionState)
events = st.sampled_from(Event)
reasons = st.sampled_from(TerminationReason)
principals = st.sampled_from(["alice", "bob", "carol"])
