"""What the CLI runs beyond the library calls: the quickstart job and the model export."""
