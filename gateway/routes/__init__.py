"""HTTP routers of the gateway, one module per part of the API."""
