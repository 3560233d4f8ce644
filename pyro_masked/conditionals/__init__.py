"""Engines that compute masked scores. They know nothing of Pyro traces."""
