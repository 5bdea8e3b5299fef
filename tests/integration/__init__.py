"""Loopback tests: real sockets on 127.0.0.1 against WSEServer."""
