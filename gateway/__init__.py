"""The HTTP JSON gateway: routes built from the contracts' google.api.http annotations."""
