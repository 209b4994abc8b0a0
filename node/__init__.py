"""The backend node: registrar + B2BUA with replicated dialog state in Redis."""
