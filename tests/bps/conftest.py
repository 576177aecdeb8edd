from postgres_fixtures import postgres_server  # noqa: F401  (session fixture)
