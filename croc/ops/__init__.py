"""The op layer: custom ops (with fake functions and autograd) between device code and the API."""
