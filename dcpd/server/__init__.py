"""The daemon: wire protocol, ZMQ frontend, asyncio scheduler loop, sd_notify, logging, metrics."""
