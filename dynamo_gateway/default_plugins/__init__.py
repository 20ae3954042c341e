"""Built-in plugins: registered like third-party ones, so they can be replaced or narrowed."""
