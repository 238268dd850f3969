"""The one typed run configuration (AppConfig and its sections), validated once, plus process-wide runtime settings."""
