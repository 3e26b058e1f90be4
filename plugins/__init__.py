"""ftq's built-in plugins: ordinary plugins, registered through the same hooks a
third-party package uses.  Installed under the import name ``ftq_plugins``."""
