"""Mixture of experts: routing, brownout to united experts, expert FFN backends, expert
parallelism, and how united experts are built."""
