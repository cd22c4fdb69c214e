"""One module per CLI command; each defines ``command`` and calls one public function."""
