"""One module per adapter kind; each defines an AdapterKind subclass and its instance `KIND`, which
loratv/adapters/registry.py registers."""
