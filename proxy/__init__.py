"""The front proxy (converged load balancer): routing by BEKey, health, ramp-up."""

import sipcore  # noqa: F401  (first: its finder loads our compiled modules)
