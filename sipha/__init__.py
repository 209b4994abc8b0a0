"""The sipha command line, the local cluster and the SIPp launcher."""
