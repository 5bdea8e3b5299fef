"""Drivers that run the wse_proto machines on real sockets (asyncio, gevent, threading)."""
