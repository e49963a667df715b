"""Replay of recorded AgentDojo agent traces through Tether's enforcement point."""
