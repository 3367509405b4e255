"""Prefill/decode disaggregation: KV transfer between peers (roles and router to come)."""
