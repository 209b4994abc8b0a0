"""The front proxy (converged load balancer): routing by BEKey, health, ramp-up."""
