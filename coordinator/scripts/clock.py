"""Redis's own clock in milliseconds, as ``now``: every script that orders by time
starts with it, so all nodes order recency by one clock."""

from __future__ import annotations

NOW = """
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
"""
