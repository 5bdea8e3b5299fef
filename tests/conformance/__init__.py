"""Tests of the conformance kit (wse_server.conformance) over loopback."""
