"""The only modules that open sockets: HTTP (with its auth), DIMSE associations, and the C-STORE receiver."""
