"""Storage: the SQLAlchemy index and the file store. Rows and files; no networking."""
