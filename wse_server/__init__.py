"""wse_server: the WSE server built from wse_proto and wse_transports."""
