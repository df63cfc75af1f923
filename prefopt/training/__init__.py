"""The training core: run preparation, the one loop, the forward + loss step, reference fit, tracking."""
