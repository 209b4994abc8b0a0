"""The backend node: registrar + B2BUA with replicated dialog state in Redis."""

import sipcore  # noqa: F401  (first: its finder loads our compiled modules)
