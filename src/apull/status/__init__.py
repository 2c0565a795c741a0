"""`apull status`: one parallel, read-only look at every node, against this checkout."""
